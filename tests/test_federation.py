"""Federation (docs/METHOD.md §9.4): deltas since a common base, their refusals, their file, and
a merge that scores as a fit on the union."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from test_updating import CONFIG, SPEC, D, assert_same_scores, fake, real, unit

from anchorscan.anchors.anchor import Anchor
from anchorscan.anchors.federation import (
    DeltaFileError,
    DeltaRefused,
    delta_from_bytes,
    delta_to_bytes,
    export_delta,
    merge,
    subtract,
)
from anchorscan.anchors.stats import Moments
from anchorscan.anchors.updating import flagged
from helpers import fit_by_hash, level_moments, update_by_hash


@pytest.fixture(scope="module")
def sites():
    """A base fitted at the coordinator and three sites that each updated it with their own
    images (one also flagged a generator)."""
    uris_a, rows_a = real(500, 1, "coordinator")
    base = fit_by_hash(SPEC, uris_a, rows_a, CONFIG)
    images = [real(n, 10 + i, f"site{i}") for i, n in enumerate((300, 200, 250))]
    site_anchors = [update_by_hash(base, uris, rows) for uris, rows in images]
    generator = fake(20, 50, unit(3), 2.0)[:, :D]
    site_anchors[2] = flagged(site_anchors[2], "newgen", Moments.of(generator))
    return base, site_anchors, images, (uris_a, rows_a), generator


def union_anchor(base: Anchor, images, generator) -> Anchor:
    """An anchor fitted on the coordinator's images and every site image the sites fitted (a
    site's held-out images stay at the site), calibrated on the coordinator's held-out images."""
    from anchorscan.anchors.calibration import holds_out

    fitted = [
        rows[~np.array([holds_out(u, CONFIG.calibration_fraction) for u in uris])] for uris, rows in images
    ]
    rows = np.vstack(fitted)
    from anchorscan.anchors.updating import merged_statistics, recalibrated

    additions = {
        "backbone": Moments.of(rows[:, : SPEC.d_backbone]),
        **level_moments(rows, SPEC),
        "flag.newgen": Moments.of(generator),
    }
    return recalibrated(base, merged_statistics(base.statistics(), additions), None, ())


def test_subtract_inverts_chans_merge():
    rows = np.random.default_rng(0).normal(size=(500, 6)) * 3 + 100
    part = subtract(Moments.of(rows), Moments.of(rows[:350]))
    assert part.n == 150
    assert np.allclose(part.mean, rows[350:].mean(axis=0), rtol=1e-12)
    # numpy's two-pass scatter as the oracle; subtraction amplifies rounding by n / n_added
    assert np.allclose(part.m2, Moments.of(rows[350:]).m2, rtol=1e-9)


def test_merged_deltas_score_as_a_fit_on_the_union_in_any_order(sites):
    base, site_anchors, images, _, generator = sites
    deltas = [delta_from_bytes(delta_to_bytes(export_delta(site, base))) for site in site_anchors]
    union = union_anchor(base, images, generator)
    features = np.vstack([real(40, 99, "x")[1], fake(40, 98, unit(2), 3.0)])[:, :D]
    for order in itertools.permutations(range(3)):
        merged = merge(base, [deltas[i] for i in order])
        assert merged.moments.n == union.moments.n and set(merged.flagged) == {"newgen"}
        # the same statistics merged in other orders; 1e-6 is the bound
        assert_same_scores(merged, union, features, rtol=1e-6)


def test_delta_below_the_minimum_count_is_refused(sites):
    base, _, _, _, _ = sites
    small = update_by_hash(base, *real(40, 60, "small"))
    with pytest.raises(DeltaRefused, match=r"added \d+ real images .* at least 64"):
        export_delta(small, base)
    assert export_delta(small, base, min_count=10).n < 64


def test_delta_from_an_unrelated_anchor_or_other_base_is_refused(sites):
    base, site_anchors, _, (_uris_a, _rows_a), _ = sites
    stranger = fit_by_hash(SPEC, *real(500, 70, "stranger"), CONFIG)
    with pytest.raises(DeltaRefused, match="not made from this base"):
        export_delta(site_anchors[0], stranger)
    delta = export_delta(site_anchors[0], base)
    with pytest.raises(DeltaRefused, match="another base"):
        merge(stranger, [delta])
    with pytest.raises(DeltaRefused, match="twice"):
        merge(base, [delta, delta])


@pytest.mark.parametrize(
    "field, value",
    [
        ("backbone", "clip-vit-b-16"),
        ("weights_sha256", "f" * 64),
        ("layout", {"d_semantic": 5, "d_statistical": 7, "d_forensic": 3, "x": 1}),
    ],
)
def test_delta_from_other_features_is_refused_before_merging(sites, field, value):
    base, site_anchors, _, _, _ = sites
    delta = export_delta(site_anchors[0], base)
    foreign = dataclasses.replace(delta, spec=dataclasses.replace(delta.spec, **{field: value}))
    before = base.moments.copy()
    with pytest.raises(DeltaRefused, match=field):
        merge(base, [delta, foreign])  # the good one first: nothing may be merged
    assert base.moments == before


def test_noise_is_recorded_and_has_its_scale(sites):
    base, site_anchors, _, _, _ = sites
    exact = export_delta(site_anchors[0], base)
    noisy = delta_from_bytes(
        delta_to_bytes(export_delta(site_anchors[0], base, noise=0.5, rng=np.random.default_rng(1)))
    )
    assert noisy.noise == 0.5
    difference = noisy.statistics["backbone"].m2 - exact.statistics["backbone"].m2
    assert np.allclose(difference, difference.T)
    # symmetric Gaussian noise, standard deviation sigma off the diagonal: 66 independent
    # entries estimate it to about 9 %, so the band is 3.5 standard errors wide
    off_diagonal = difference[np.triu_indices(len(difference), 1)]
    assert 0.35 < off_diagonal.std() < 0.65


def test_low_rank_delta_keeps_its_rank_and_shrinks_the_file(sites):
    base, site_anchors, _, _, _ = sites
    full = export_delta(site_anchors[0], base)
    low = delta_from_bytes(delta_to_bytes(export_delta(site_anchors[0], base, rank=4)))
    m2 = low.statistics["backbone"].m2
    assert np.linalg.matrix_rank(m2) == 4 and low.factors["backbone"].shape == (SPEC.d_backbone, 4)
    eigenvalues = np.linalg.eigvalsh(full.statistics["backbone"].m2)[::-1]
    assert low.kept_energy["backbone"] == pytest.approx(eigenvalues[:4].sum() / eigenvalues.sum())
    # the best rank-4 approximation (Eckart-Young): the error is the discarded eigenvalues
    assert np.linalg.norm(full.statistics["backbone"].m2 - m2, 2) == pytest.approx(eigenvalues[4], rel=1e-8)
    assert len(delta_to_bytes(low)) < len(delta_to_bytes(full))
    merge(base, [low])  # a low-rank delta merges like any other


def test_delta_file_is_checked(sites):
    base, site_anchors, _, _, _ = sites
    data = bytearray(delta_to_bytes(export_delta(site_anchors[0], base)))
    data[-5] ^= 0xFF
    with pytest.raises(DeltaFileError, match="checksum"):
        delta_from_bytes(bytes(data))
    from anchorscan.anchors.anchor_file import anchor_to_bytes

    with pytest.raises(DeltaFileError, match="not an anchorscan delta"):
        delta_from_bytes(anchor_to_bytes(base))


# --- trust boundaries (issue #20) ---------------------------------------------------------------


def test_the_same_statistics_under_another_site_id_are_refused_now_and_later(sites):
    base, site_anchors, _, _, _ = sites
    delta = export_delta(site_anchors[0], base)
    renamed = dataclasses.replace(delta, site_id="f" * 64, site_lineage=("f" * 64,))
    with pytest.raises(DeltaRefused, match="already merged"):
        merge(base, [delta, renamed])
    merged = merge(base, [delta])
    assert f"delta:{delta.content_id}" in merged.lineage
    # a later merge into the merged anchor: by content, whatever site the delta names
    with pytest.raises(DeltaRefused, match="already merged"):
        merge(merged, [renamed])
    with pytest.raises(DeltaRefused, match="already merged"):
        merge(update_by_hash(merged, *real(80, 77, "later")), [delta])  # and after an update


def test_a_site_delta_since_its_last_merged_one_joins_exactly_a_cumulative_one_is_refused(sites):
    base, _, _, _, _ = sites
    first = update_by_hash(base, *real(200, 80, "s-first"))
    second = update_by_hash(first, *real(150, 81, "s-second"))
    merged = merge(base, [export_delta(first, base)])
    cumulative = export_delta(second, base)  # holds the first delta's images again
    with pytest.raises(DeltaRefused, match="images the base already has"):
        merge(merged, [cumulative])
    with pytest.raises(DeltaRefused, match="images the base already has"):
        merge(base, [export_delta(first, base), cumulative])
    later = merge(merged, [export_delta(second, first)])  # what the site added since
    assert later.moments.n == second.moments.n
    # Chan's merge against the site's own statistics: subtraction rounding, amplified by
    # n / n_added (about 5 here)
    assert np.allclose(
        later.moments.m2, second.moments.m2, rtol=1e-8, atol=1e-10 * np.abs(second.moments.m2).max()
    )
    with pytest.raises(DeltaRefused, match="images the base already has"):
        merge(second, [export_delta(second, base)])  # into the site itself


def test_a_delta_below_its_own_minimum_count_is_refused(sites):
    base, site_anchors, _, _, _ = sites
    delta = export_delta(site_anchors[0], base)
    claimed = dataclasses.replace(delta, min_count=delta.n + 1)
    with pytest.raises(DeltaRefused, match="below its own minimum count"):
        merge(base, [claimed])


def test_noise_leaves_a_delta_that_loads_and_merges(sites):
    base, site_anchors, _, _, _ = sites
    noisy = export_delta(site_anchors[0], base, noise=50.0, rng=np.random.default_rng(3))
    # noise of this size makes M2 indefinite; export keeps its positive part, a scatter matrix
    assert np.linalg.eigvalsh(noisy.statistics["backbone"].m2)[0] >= -1e-9 * np.trace(
        noisy.statistics["backbone"].m2
    )
    merge(base, [delta_from_bytes(delta_to_bytes(noisy))])


@pytest.fixture(scope="module")
def keys():
    from anchorscan.anchors.signing import Signer, new_key_pair, trusted_keys

    pairs = [new_key_pair() for _ in range(2)]
    return [Signer(private) for private, _ in pairs], trusted_keys({"site-a.pub": pairs[0][1]})


def test_signed_deltas_from_enrolled_sites_only(sites, keys):
    from anchorscan.anchors.federation import check_signatures

    base, site_anchors, _, _, _ = sites
    (enrolled, stranger), trusted = keys
    signed = delta_from_bytes(delta_to_bytes(export_delta(site_anchors[0], base), enrolled))
    assert signed.signer == enrolled.fingerprint and check_signatures([signed], trusted, ["a"]) == []
    unsigned = delta_from_bytes(delta_to_bytes(export_delta(site_anchors[0], base)))
    with pytest.raises(DeltaRefused, match="not signed"):
        check_signatures([unsigned], trusted, ["a"])
    other = delta_from_bytes(delta_to_bytes(export_delta(site_anchors[1], base), stranger))
    with pytest.raises(DeltaRefused, match="not among the --trust keys"):
        check_signatures([other], trusted, ["b"])
    # without --trust: merged, with a warning that says what that means
    assert "not who wrote them" in check_signatures([unsigned], None, ["a"])[0]


def test_a_signed_delta_changed_after_signing_is_refused(sites, keys):
    import json
    import struct

    import safetensors.numpy

    from anchorscan.anchors import checked_file
    from anchorscan.anchors.federation import METADATA_KEY, check_signatures

    base, site_anchors, _, _, _ = sites
    (enrolled, _), trusted = keys
    data = delta_to_bytes(export_delta(site_anchors[0], base), enrolled)
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][METADATA_KEY])
    tensors = dict(safetensors.numpy.load(data))
    tensors["delta.backbone.mean"] = tensors["delta.backbone.mean"] * 2  # the forger's change
    metadata["checksum"] = checked_file.checksum(metadata, tensors)  # and a fresh checksum
    forged = delta_from_bytes(safetensors.numpy.save(tensors, metadata={METADATA_KEY: json.dumps(metadata)}))
    with pytest.raises(DeltaRefused, match="signature does not verify"):
        check_signatures([forged], trusted, ["a"])


def test_exposed_private_keys_are_warned_about_and_merge_names_the_verifying_key(
    sites, tmp_path, capsys, caplog
):
    """From the command line: a private key others can read given to --sign, and a site's
    private key copied into the --trust folder, are each warned about (the delta still signs and
    merges); the merge names the enrolled key file and fingerprint that verified the delta."""
    import logging
    import os

    from anchorscan.anchors.anchor_file import anchor_to_bytes
    from anchorscan.pipelines.cli import main

    base, site_anchors, _, _, _ = sites
    base_file, site_file = tmp_path / "base.safetensors", tmp_path / "site.safetensors"
    base_file.write_bytes(anchor_to_bytes(base))
    site_file.write_bytes(anchor_to_bytes(site_anchors[0]))
    trust = tmp_path / "trust"
    trust.mkdir()
    assert main(["keygen", "--output", str(trust / "site-a")]) == 0
    fingerprint = capsys.readouterr().out.split("fingerprint ")[1].split()[0]
    key = trust / "site-a.key"  # the careless coordinator keeps the site's private key beside its .pub
    os.chmod(key, 0o644)  # and anyone on the machine can read it

    delta = tmp_path / "site-a.delta"
    export = ["export-delta", "--anchor", str(site_file), "--since", str(base_file), "--sign", str(key)]
    with caplog.at_level(logging.WARNING):
        assert main([*export, "--output", str(delta)]) == 0
    assert [
        r.getMessage() for r in caplog.records if f"--sign {key} can be read by other users" in r.getMessage()
    ]
    caplog.clear()
    os.chmod(key, 0o600)
    with caplog.at_level(logging.WARNING):
        assert main([*export, "--output", str(tmp_path / "again.delta")]) == 0
    assert not [r for r in caplog.records if "can be read by other users" in r.getMessage()]

    merged = tmp_path / "merged.safetensors"
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert (
            main(["merge", str(base_file), str(delta), "--output", str(merged), "--trust", str(trust)]) == 0
        )
    assert [r for r in caplog.records if "holds site-a.key, a private key" in r.getMessage()]
    assert f"{delta} verified by site-a.pub (fingerprint {fingerprint})" in capsys.readouterr().out


def test_a_site_that_calibrated_since_the_base_still_exports_and_merges(sites):
    """`calibrate` records itself in the lineage; a delta's site lineage holds statistics ids
    only, so the record stays at the site and the delta is read and merged as before."""
    from anchorscan.anchors.calibration import CALIBRATION_PREFIX

    base, site_anchors, _, _, _ = sites
    record = f"{CALIBRATION_PREFIX}2026-12-07T21:00:00Z images=300 distinct=300 forced=no"
    site = dataclasses.replace(site_anchors[0], lineage=(*site_anchors[0].lineage, record))
    delta = delta_from_bytes(delta_to_bytes(export_delta(site, base)))
    assert record not in delta.site_lineage
    assert merge(base, [delta]).moments.n == site.moments.n
