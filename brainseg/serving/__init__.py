"""Serving the segmenter: ``pyfunc`` (the custom ``mlflow.pyfunc`` model, logged with the run),
``request`` (decoding and checking a request table), ``limits`` (what one request may hold; no
MLflow import, the page reads it too) and ``app`` (MLflow's scoring app behind a body limit, for
``uvicorn --factory brainseg.serving.scoring_app:create_app``).

The package imports nothing itself: ``brainseg.serving.limits`` loads without MLflow or TensorFlow.
"""
