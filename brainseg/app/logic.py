"""What the web page does, as plain functions (nothing here imports Streamlit).

Split along the page's sections; this module holds the page's settings and is its one import:

- :mod:`brainseg.app.uploads`: uploaded files and zips -> slices with truth masks, data.csv;
  the bundled synthetic examples;
- :mod:`brainseg.app.backends`: the segmenter backends (in-process
  :class:`brainseg.inference.segmenter.Segmenter`, or a served endpoint), the survival model, provenance
  and the model card's facts;
- :mod:`brainseg.app.results`: segmenting a patient volume at a time, tables with units and a
  glossary, per-patient volume features (shared with ``brainseg predict`` through
  :mod:`brainseg.pipeline.slices`), pictures and downloads;
- :mod:`brainseg.app.volumes`: a scanner volume uploaded as NIfTI (FLAIR, optionally pre/post),
  segmented by ``brainseg predict --flair``'s path, its volume in mL, its slices and its mask.
"""

from __future__ import annotations

import dataclasses
import os

from brainseg.app.backends import (  # noqa: F401  (re-exported for the page)
    InProcessBackend,
    RestBackend,
    SegmentError,
    SurvivalBackend,
    make_segmenter,
    registered_version,
    survival_context,
)
from brainseg.app.provenance import card_lines, model_provenance, provenance_line  # noqa: F401
from brainseg.app.results import (  # noqa: F401
    PATIENT_GLOSSARY,
    SLICE_GLOSSARY,
    SliceResult,
    analyse,
    area_by_slice,
    by_patient,
    column_label,
    csv_bytes,
    default_slice,
    glossary_table,
    masks_zip,
    patient_table,
    slice_table,
    slice_views,
    with_provenance,
)
from brainseg.app.uploads import (  # noqa: F401
    EXAMPLES,
    MIN_SIDE,
    UPLOAD_TYPES,
    SliceInput,
    Upload,
    decode_slice,
    example_upload,
    parse_uploads,
)
from brainseg.app.volumes import (  # noqa: F401
    SEQUENCE_LABELS,
    VOLUME_TYPES,
    analyse_volume,
    default_volume_slice,
    mask_download,
    parse_volume_uploads,
    volume_line,
    volume_metric,
    volume_views,
)
from brainseg.pipeline.slices import identify  # noqa: F401  (re-exported for the page)

DEFAULT_MODEL = "models:/brainseg-segmenter@champion"
DEFAULT_SURVIVAL = "models:/brainseg-survival@champion"
ENV_MODEL = "BRAINSEG_APP_MODEL"
ENV_SURVIVAL = "BRAINSEG_APP_SURVIVAL_MODEL"  # empty: no survival model
ENV_ENDPOINT = "BRAINSEG_APP_ENDPOINT"        # empty: segment in-process
SURVIVAL_DISCLAIMER = ("Research model, not a diagnosis: the probability of death (death01) comes "
                       "from a model fitted on a small public research cohort (TCGA-LGG) and "
                       "must not be used for clinical decisions.")


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """What ``brainseg app`` hands the page (through environment variables)."""

    model_uri: str = DEFAULT_MODEL
    survival_uri: str | None = DEFAULT_SURVIVAL
    endpoint: str | None = None

    @classmethod
    def from_env(cls, env=None) -> AppSettings:
        env = os.environ if env is None else env
        return cls(model_uri=env.get(ENV_MODEL) or DEFAULT_MODEL,
                   survival_uri=env.get(ENV_SURVIVAL, DEFAULT_SURVIVAL) or None,
                   endpoint=env.get(ENV_ENDPOINT) or None)

    def to_env(self) -> dict[str, str]:
        return {ENV_MODEL: self.model_uri, ENV_SURVIVAL: self.survival_uri or "",
                ENV_ENDPOINT: self.endpoint or ""}
