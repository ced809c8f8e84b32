"""Benchmark: the backdoor scan (every family of the video modality) on one video model, as a JSON record.

    .venv/bin/python benchmarks/scan_video.py runs/video/models/clean-label benchmarks/results/scan_video/received.json
    .venv/bin/python benchmarks/scan_video.py runs/video/purified/clean-label/recommended \
        benchmarks/results/scan_video/purified-recommended.json

Scans on the run's clean validation clips (``--data``, default ``runs/video/data``), one process per model
(about 14 minutes at one thread). ``pipeline.scan.scan_from_record`` and ``removal`` read two records back
into the "what the purification removed" verdict (README, "Is there a backdoor?").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from modalities.contract import get_modality
    from pipeline.scan import scan_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path("runs/video/data"))
    args = ap.parse_args()
    mod = get_modality("video")
    x, y = mod.load_split(args.data, "val")
    model, meta = mod.load_model(args.model_dir)
    model.eval()
    t0 = time.time()
    result = scan_model(mod, model, (x, y), int(meta.get("num_classes") or int(y.max()) + 1), progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result.to_record()))
    print(f"{args.model_dir}: {time.time() - t0:.0f} s, flagged {result.flagged}, suspected {result.suspected}")


if __name__ == "__main__":
    main()
