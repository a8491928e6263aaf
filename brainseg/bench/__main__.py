"""``python -m brainseg.bench train-worker SPEC.json OUT.json``: the training section's child process."""

import json
import sys
from pathlib import Path

from brainseg.bench.training import train_throughput

if len(sys.argv) == 4 and sys.argv[1] == "train-worker":
    result = train_throughput(json.loads(Path(sys.argv[2]).read_text()))
    Path(sys.argv[3]).write_text(json.dumps(result))
else:
    sys.exit("usage: python -m brainseg.bench train-worker SPEC.json OUT.json")
