"""`anchorscan keygen --output SITE`: a site's Ed25519 key pair for signing deltas (docs/METHOD.md
§9.4): SITE.key, the private key (PEM, mode 0600: it stays on the site's machine), and SITE.pub,
the public key the coordinator puts in its `merge --trust` folder."""

from __future__ import annotations

import os

from anchorscan.anchors.errors import UsageError
from anchorscan.anchors.io.storage import check_writable, write_atomically
from anchorscan.anchors.io.uris import Location
from anchorscan.anchors.signing import Signer, new_key_pair
from anchorscan.pipelines.flags import command_parser, text


def parser():
    parser = command_parser("keygen", beam=False)
    parser.add_argument(
        "--output",
        type=text,
        required=True,
        metavar="SITE",
        help="writes SITE.key and SITE.pub (local paths)",
    )
    return parser


def run(argv=None) -> dict:
    args = parser().parse_args(argv)
    if Location.parse(args.output).is_remote:
        raise UsageError(f"--output {args.output}: keys are written to local files; copy SITE.pub yourself")
    private_path, public_path = f"{args.output}.key", f"{args.output}.pub"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} exists: keygen never replaces a key; choose another --output")
    check_writable(private_path, "--output")
    private, public = new_key_pair()
    write_atomically(private_path, private, mode=0o600)
    write_atomically(public_path, public)
    fingerprint = Signer(private).fingerprint
    print(
        f"private key {private_path} (mode 0600: keep it on this site's machine; export-delta --sign)\n"
        f"public key  {public_path} (give it to the coordinator for merge --trust)\n"
        f"fingerprint {fingerprint}"
    )
    return {"key": private_path, "pub": public_path, "fingerprint": fingerprint}
