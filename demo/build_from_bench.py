"""Build /work/main/demo/data from /work/shared/bench/dev (one-off helper, not in repo)."""
import csv, hashlib, os, shutil
from pathlib import Path
import numpy as np
from PIL import Image

SRC = Path('/work/shared/bench/dev')
DST = Path('/work/main/demo/data')
OK = ['gcompris-qt-data', 'lomiri-wallpapers-16.04', 'lomiri-wallpapers-20.04', 'lxqt-themes',
      'opencv-doc', 'scikit-image', 'scratch']
SCAN_CLASSES = ['real', 'bicubic', 'realesrgan', 'realcugan', 'waifu2x']
N_SCAN = 23
LIC = {
    'gcompris-qt-data': "CC-BY-SA-4.0, CC0-1.0 or public domain (per-photo licence in the package's README files)",
    'lomiri-wallpapers-16.04': 'CC-BY-4.0; CC-BY-SA-4.0; CC0-1.0',
    'lomiri-wallpapers-20.04': 'CC-BY-SA-3.0',
    'lxqt-themes': 'CC-BY-SA-3.0 (wallpapers/License; debian/copyright Files: * LGPL-2.1+)',
    'opencv-doc': 'Apache-2.0 AND BSD-3-Clause (Files: *)',
    'scikit-image': 'CC0; Middlebury stereo data (scikit-image BSD-3-Clause); public domain',
    'scratch': 'CC-BY-SA-3.0 (Media/*, MIT)',
}

rows = [r for r in csv.DictReader(open(SRC / 'manifest.csv')) if r['package'] in OK]
by = {(r['source_photo'], r['class']): r for r in rows}
photos = sorted({r['source_photo'] for r in rows}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
pkg = {r['source_photo']: r['package'] for r in rows}
# scikit-image photos always go to FIT: demo/package_photos.py can regenerate crops of them
cand = [p for p in photos if pkg[p] != 'scikit-image']
scan = sorted(cand[:N_SCAN])
fit = sorted(set(photos) - set(scan))
assert not set(scan) & set(fit)

if DST.exists():
    shutil.rmtree(DST)

def write(src_rel, dst):
    src = Image.open(SRC / src_rel)
    assert src.mode == 'RGB' and src.size == (256, 256), (src_rel, src.mode, src.size)
    arr = np.asarray(src)
    out = Image.fromarray(arr[16:240, 16:240].copy(), 'RGB')
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst, 'PNG', optimize=True)
    back = Image.open(dst)
    assert back.mode == 'RGB' and back.size == (224, 224)
    assert not back.info.get('exif') and not getattr(back, 'text', {}), dst
    assert np.array_equal(np.asarray(back), arr[16:240, 16:240]), dst
    assert np.array_equal(np.asarray(back), np.asarray(src.crop((16, 16, 240, 240)))), dst

table = []
for p in fit:
    r = by[(p, 'real')]
    name = Path(r['path']).name
    write(r['path'], DST / 'fit' / 'real' / name)
    table.append((f'fit/real/{name}', p, pkg[p]))
man = []
for c in SCAN_CLASSES:
    for p in scan:
        r = by[(p, c)]
        name = Path(r['path']).name
        write(r['path'], DST / 'scan' / c / name)
        table.append((f'scan/{c}/{name}', p, pkg[p]))
        man.append((f'{c}/{name}', 'real' if c == 'real' else 'fake', c))
with open(DST / 'scan' / 'manifest.csv', 'w', newline='') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(['uri', 'label', 'generator'])
    w.writerows(man)

readme = (SRC.parent / 'README.md').read_text()
from collections import Counter
pk_fit, pk_scan = Counter(pkg[p] for p in fit), Counter(pkg[p] for p in scan)
lines = [
    '# Demo data: sources and licences', '',
    'Small demo set copied from the anchorscan development bench. Every image is the exact',
    'centre 224x224 crop (box 16,16,240,240; pixels copied, no resampling) of a 256x256 bench',
    'crop, re-saved as lossless RGB PNG without metadata.', '',
    'The real crops come from colour camera photographs shipped in Debian 12 (bookworm) packages',
    '(gcompris-qt-data, lomiri-wallpapers-16.04, lomiri-wallpapers-20.04, lxqt-themes, opencv-doc,',
    'scratch) and in the scikit-image PyPI package (sample data). Bench crops were taken on a',
    'non-overlapping 256 px grid (textured crops only); photos whose shorter side exceeds 1000 px',
    'were first halved with an area filter. Only packages with permissive or attribution licences',
    'are used here; GPL-only sources of the bench are left out.', '',
    'The fake classes are derivatives of the real crops made by the generators below (the same',
    'crop in every class, so each fake carries the licence of its real source photo):', '',
    '| class | how it was made from the real crop |', '| --- | --- |',
]
for l in readme.splitlines():
    cells = [c.strip() for c in l.split('|')]
    if len(cells) > 2 and cells[1] in ('real', 'bicubic', 'realesrgan', 'realcugan', 'waifu2x'):
        lines.append(l)
lines += ['',
    '(The bench also has a `bicubic_x2` class, not bundled here.)', '',
    'Layout:', '',
    f'- `fit/real/`: {len(fit)} real crops, one per source photo (FIT photos).',
    f'- `scan/<class>/`: {len(scan)} crops per class for real, bicubic, realesrgan, realcugan, waifu2x,',
    '  the same file names in every class (SCAN photos); `scan/manifest.csv` lists uri, label, generator.',
    '- FIT and SCAN are disjoint by source photo. The scikit-image photos always go to FIT (the',
    '  same photos are reachable through `demo/package_photos.py`, so they must not be scanned);',
    '  the other photos were ordered by the SHA-256 of their name, the first',
    f'  {len(scan)} went to SCAN and the rest to FIT.', '',
    '## Licences by package', '',
    '| package | licence(s) | FIT photos | SCAN photos |', '| --- | --- | --- | --- |',
]
for k in OK:
    lines.append(f'| {k} | {LIC[k]} | {pk_fit[k]} | {pk_scan[k]} |')
lines += ['',
    'Per-photo licences of gcompris-qt-data are in the README files inside its .rcc resources, of',
    'lomiri-wallpapers in /usr/share/doc/PKG/copyright.', '',
    '## Files', '', '| path | source photo | package | licence |', '| --- | --- | --- | --- |']
for path, p, k in table:
    lines.append(f'| {path} | {p} | {k} | {LIC[k]} |')
(DST / 'SOURCES.md').write_text('\n'.join(lines) + '\n')
print('fit', len(fit), dict(pk_fit)); print('scan', len(scan), dict(pk_scan))
print('SCAN:', scan); print('FIT:', fit)
