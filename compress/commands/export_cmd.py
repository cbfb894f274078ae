"""``compress export``: a run's compiled model as a bundle that runs on the device."""

from __future__ import annotations

import argparse
import json


def cmd_export(a: argparse.Namespace) -> int:
    from ..apps.bundle import export_bundle

    out = export_bundle(a.run_dir, a.target, a.out, variant=a.variant, force=a.force)
    import hashlib

    raw = (out / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    if a.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"wrote {out}: {manifest['variant']} on {a.target} ({manifest['precision']}, {manifest['model']}); on the "
          f"device: pip install '{manifest['runtime']['package']}=={manifest['runtime']['version']}' numpy, then "
          f"python {out}/run.py --expect-manifest-sha256 {hashlib.sha256(raw).hexdigest()} (the manifest's digest: "
          "keep it where the bundle's copy cannot change it)")
    return 0
