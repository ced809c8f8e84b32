"""Scan one video model on the pipeline's clean val split (four families), write the record as JSON."""
import sys, json, time
from pathlib import Path
from modalities.contract import get_modality
from pipeline.scan import scan_model
mod = get_modality("video")
x, y = mod.load_split(Path("runs/video/data"), "val")
m, _ = mod.load_model(Path(sys.argv[1])); m.eval()
t = time.time()
r = scan_model(mod, m, (x, y), 8, progress=False)
Path(sys.argv[2]).write_text(json.dumps(r.to_record()))
print(sys.argv[1], f"{time.time()-t:.0f}s flagged {r.flagged} suspected {r.suspected}")
