"""``brainseg bench``: training, inference, serving, memory and tuning measured side by side in one run.

Everything is written into a temporary working folder (synthetic data, a throw-away MLflow
tracking/registry database, the logged model, the Optuna storage) except the JSON report. A
``--model`` URI is resolved in the user's tracking store first, then copied in.

Sections (one module each):

- :mod:`.training`: slices/s of ``fit`` fed by the real input pipeline vs one in-memory batch;
  their ratio is the pipeline efficiency (target >= 0.95). A child process; its peak RSS is the
  training memory.
- :mod:`.inference`: the network, ``Segmenter.segment``, the pyfunc and REST on the same model,
  input size and slices, interleaved in rounds after a warm-up (hundreds of calls at batch 1,
  tens at batch 32): p10/p50/p90 and spread, the batch-1 profile of the served path, a cProfile
  of the pyfunc, and consistency checks that flag impossible orderings.
- :mod:`.server`: ``mlflow models serve`` on 127.0.0.1, the load test (``clients`` threads, one
  keep-alive ``requests.Session`` each, for ``load_seconds``).
- :mod:`.tuning` (optional): the same smoke study with and without pruning.
- :mod:`.report`: :func:`run_bench`, the table and the JSON.

The numbers are only as quiet as the machine: the report records the load average before and after.
"""

from brainseg.bench.report import run_bench
from brainseg.bench.server import ModelServer, dataframe_split, experiment_in, register_champion, serve_model

__all__ = ["ModelServer", "dataframe_split", "experiment_in", "register_champion", "run_bench", "serve_model"]
