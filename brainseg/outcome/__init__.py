"""The outcome model: tumor features, the ``death01`` classifier, its MLflow runs, pyfunc and client.

- ``features``   per-slice and per-patient tumor features from binary masks (pure numpy).
- ``oof``        out-of-fold predicted masks: cheap fold segmenters, each predicting the patients
                 it never saw, so the model is fitted on the kind of features it is served.
- ``model``      the joined patients table and the scikit-learn pipeline (one-hot codes, ordinal
                 grade, continuous age and imaging, imputation inside folds, nested-CV logistic
                 regression).
- ``cv``         repeated cross-validation, feature-set comparison, importances, figures.
- ``validate``   the served model's input contract: columns, types, ranges, known-field minimum.
- ``pyfunc``     the served model (``mlflow.pyfunc``) and how it is logged; the answer's contract.
- ``runs``       MLflow runs of a comparison (parent + one child per candidate).
- ``client``     building the served model's input from predicted features and data.csv.
- ``workflow``   the ``brainseg features`` and ``brainseg survival`` workflows.
"""
