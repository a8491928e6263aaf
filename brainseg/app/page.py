"""The Streamlit page of ``brainseg app``. Thin: every computation is in :mod:`brainseg.app.logic`.

Settings come from the environment (see ``logic.AppSettings``). A ready backend placed in
``st.session_state["backend"]`` / ``["survival"]`` is used instead of loading one (tests,
embedding).
"""

from __future__ import annotations

import math

import streamlit as st

from brainseg.app import logic

BACKEND_KEY, SURVIVAL_KEY, ANALYSIS_KEY, SCAN_KEY = "backend", "survival", "analysis", "scan"
UPLOAD, EXAMPLE, SCAN = "Upload files", "Bundled synthetic example", "Upload a scan (NIfTI volumes)"

st.set_page_config(page_title="brainseg: LGG tumor segmentation", layout="wide")
settings = logic.AppSettings.from_env()


@st.cache_resource(show_spinner="Loading the segmentation model...")
def load_segmenter(model_uri: str, endpoint: str | None):
    return logic.make_segmenter(logic.AppSettings(model_uri=model_uri, endpoint=endpoint))


@st.cache_resource(show_spinner="Loading the survival model...")
def load_survival(model_uri: str):
    return logic.SurvivalBackend.load(model_uri)


def segmenter():
    if BACKEND_KEY in st.session_state:
        return st.session_state[BACKEND_KEY]
    try:
        return load_segmenter(settings.model_uri, settings.endpoint)
    except Exception as exc:  # noqa: BLE001 - shown on the page, never as a traceback
        st.error(f"The segmentation model {settings.endpoint or settings.model_uri} cannot be "
                 f"loaded: {exc}")
        st.stop()


def survival_model():
    """(backend or None, why not)."""
    if SURVIVAL_KEY in st.session_state:
        return st.session_state[SURVIVAL_KEY], ""
    if not settings.survival_uri:
        return None, "No survival model is configured for this page."
    try:
        return load_survival(settings.survival_uri), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"The survival model {settings.survival_uri} cannot be loaded: {exc}"


def read_inputs(mode: str):
    """(key identifying the inputs, function giving the parsed Upload)."""
    if mode == EXAMPLE:
        title = st.selectbox("Example", list(logic.EXAMPLES))
        return ("example", title), lambda: logic.example_upload(title)
    files = st.file_uploader(
        "Slices (.tif or .png; add the *_mask.tif files to see the Dice), a .zip of a patient "
        "folder, and optionally data.csv", type=logic.UPLOAD_TYPES, accept_multiple_files=True)
    files = files or []
    key = ("upload", tuple((f.file_id, f.name, f.size) for f in files))
    return key, lambda: logic.parse_uploads((f.name, f.getvalue()) for f in files)


def analyse(key, parse) -> dict:
    """Parse and segment once per set of inputs; reruns (slider moves) reuse the session's copy."""
    state = st.session_state.get(ANALYSIS_KEY)
    backend = segmenter()
    if state is not None and state["key"] == (key, id(backend)):
        return state
    upload = parse()
    bar = st.progress(0.0, text="Segmenting...") if upload.slices else None
    results, problems = logic.analyse(upload.slices, backend, progress=lambda done, n: bar.progress(
        done / n, f"Segmenting: {done}/{n} slices"))
    if bar:
        bar.empty()
    patients, patient_problems = logic.patient_table(results)
    state = {"key": (key, id(backend)), "upload": upload, "results": results,
             "problems": upload.problems + problems + patient_problems, "patients": patients,
             "provenance": backend.describe(),
             "masks_zip": logic.masks_zip(results) if results else b"",
             "survival": {}}
    st.session_state[ANALYSIS_KEY] = state
    return state


UNITS_NOTE = ("Lengths and areas are in pixels (px): the images carry no pixel spacing, so nothing here is "
              "in mm or mm² (spacing unknown). Hover a column header for its meaning, or open the glossary.")
SPACING_UNKNOWN = ("spacing unknown: slice files carry no pixel spacing, so no volume in mL is given (upload a "
                   "NIfTI scan for mL)")


def show_table(table, glossary: dict) -> None:
    """A table whose headers carry their units, with a one-line glossary per column."""
    config = {c: st.column_config.Column(logic.column_label(c, glossary), help=glossary[c][1])
              for c in table.columns if c in glossary}
    st.dataframe(table.round(3), hide_index=True, column_config=config)
    with st.expander("Glossary: unit and meaning of each column"):
        st.table(logic.glossary_table(list(table.columns), glossary))


def show_features(state: dict) -> None:
    table = logic.slice_table(state["results"])
    st.subheader("Features per slice")
    st.caption(UNITS_NOTE)
    show_table(table, logic.SLICE_GLOSSARY)
    left, right = st.columns(2)
    features_csv = logic.csv_bytes(logic.with_provenance(table, state["provenance"]))
    left.download_button("Download features (CSV)", features_csv, "features.csv", "text/csv")
    right.download_button("Download predicted masks (zip of PNG)", state["masks_zip"], "masks.zip",
                          "application/zip")


def show_slice(group: list[logic.SliceResult], patient: str) -> None:
    index = 0
    if len(group) > 1:
        index = st.slider("Slice (position in the uploaded volume)", 1, len(group),
                          logic.default_slice(group) + 1, key=f"slice-{patient}",
                          help="Opens on the slice with the largest predicted tumor.") - 1
    r = group[index]
    st.caption(f"Slice number {r.item.slice}: tumor {'yes' if r.features['tumor'] else 'no'}, "
               f"area {r.features['area_px']} px")
    for column, (caption, picture) in zip(st.columns(3), logic.slice_views(r)):
        column.image(picture, caption=caption, width=300)


def show_patient(state: dict, patient: str, group: list[logic.SliceResult]) -> None:
    rows = state["patients"]
    row = rows[rows["patient"] == patient] if not rows.empty else rows
    if row.empty:
        return
    info = row.iloc[0]
    left, middle, right, last = st.columns(4)
    left.metric("Tumor volume (px, predicted)", f"{int(info['tumor_volume_px']):,}")
    middle.metric("Tumor volume (mL)", "spacing unknown", help=SPACING_UNKNOWN)
    right.metric("Slices with tumor", f"{int(info['tumor_slices'])} of {int(info['slices'])}")
    if "volume_dice" in info and not math.isnan(info["volume_dice"]):
        last.metric("Volume Dice vs truth", f"{info['volume_dice']:.3f}")
    st.line_chart(logic.area_by_slice(group), x_label="slice number", y_label="tumor area (px)")
    model, why = survival_model()
    if model is None:
        st.info(why)
    else:
        if patient not in state["survival"]:
            try:
                answer = model.probabilities(row, state["upload"].clinical).iloc[0].to_dict()
                state["survival"][patient] = answer
            except Exception as exc:  # noqa: BLE001
                state["survival"][patient] = f"survival model failed: {exc}"
        answer = state["survival"][patient]
        if isinstance(answer, str):
            st.error(answer)
        else:
            show_survival(answer, state["upload"], len(group), model.describe())
    st.warning(logic.SURVIVAL_DISCLAIMER)


def show_survival(answer: dict, upload, n_slices: int, provenance: dict) -> None:
    """The probability only with its evidence (CV ROC-AUC, patients, data; synthetic said plainly)."""
    verdict, context = logic.survival_context(answer)
    if verdict != "show":
        st.info(context)
        return
    clinical = (f"clinical data from {upload.clinical_name}" if upload.clinical
                else "no data.csv uploaded: clinical fields imputed")
    st.metric("Survival model: probability of death01 = 1", f"{float(answer['death01_probability']):.1%}",
              help=f"From the volume features of the {n_slices} uploaded slices; {clinical}.")
    (st.warning if answer.get("fitted_on") == "synthetic" else st.caption)(context)
    st.caption(logic.provenance_line(provenance))


def show_model(provenance: dict) -> None:
    """The sidebar: which model, trained on what, how good on validation (its model card)."""
    st.header("Model")
    st.write(logic.provenance_line(provenance))
    for level, text in logic.card_lines(provenance):
        (st.warning if level == "warning" else st.caption)(text)
    if provenance.get("card"):
        with st.expander("Model card"):
            st.markdown(provenance["card"])
    st.caption(deployment_note())


def deployment_note() -> str:
    if BACKEND_KEY in st.session_state:
        return "Segmenter provided by the hosting application."
    if settings.endpoint:
        return (f"Slices are sent to the served model at {settings.endpoint}; it reports its run "
                "and data version with each result.")
    registry = settings.model_uri.startswith("models:/")
    where = "the MLflow model registry" if registry else "a model file"
    return f"Model loaded from {where} and run in this process."


def read_scan_uploads():
    """(key identifying the uploaded volumes, function giving {sequence: (name, bytes) or None})."""
    picked = {}
    for column, (sequence, label) in zip(st.columns(3), logic.SEQUENCE_LABELS.items()):
        optional = "" if sequence == "flair" else " (optional, 3-channel models)"
        picked[sequence] = column.file_uploader(f"{label} volume, .nii or .nii.gz{optional}", type=logic.VOLUME_TYPES,
                                                key=f"volume-{sequence}")
    key = tuple((k, f.file_id, f.name, f.size) for k, f in picked.items() if f is not None)
    return key, lambda: {k: (f.name, f.getvalue()) if f is not None else None for k, f in picked.items()}


def analyse_scan(key, files) -> dict:
    """Read and segment the uploaded volumes once; reruns (the slider) reuse the session's copy."""
    state, backend = st.session_state.get(SCAN_KEY), segmenter()
    if state is not None and state["key"] == (key, id(backend)):
        return state
    upload, problems = logic.parse_volume_uploads(files())
    result = None
    if upload is not None:
        with st.spinner("Segmenting the volume..."):
            result, more = logic.analyse_volume(upload, backend)
        problems += more
    state = {"key": (key, id(backend)), "result": result, "problems": problems, "provenance": backend.describe()}
    st.session_state[SCAN_KEY] = state
    return state


def show_scan() -> None:
    """A patient's NIfTI volumes: the volume in mL, a slider over the slices with the overlay, downloads."""
    state = analyse_scan(*read_scan_uploads())
    for problem in state["problems"]:
        st.error(problem)
    result = state["result"]
    if result is None:
        st.info("Upload the patient's FLAIR volume (.nii or .nii.gz; pre- and post-contrast T1 too for a "
                "3-channel model). A DICOM series: convert it first (dcm2niix), or use brainseg predict --flair.")
        return
    st.caption("Result produced by " + logic.provenance_line(state["provenance"]))
    st.subheader(f"Patient {result.name}")
    line = logic.volume_line(result.patient)
    left, right = st.columns(2)
    left.metric("Tumor volume (predicted)", logic.volume_metric(result.patient), help=line)
    right.metric("Slices with tumor", f"{int(result.patient['tumor_slices'])} of {len(result.masks)}")
    st.caption(f"{line}; coordinates {result.patient['coordinates'] or 'unknown'} (mm, RAS+: right, anterior, "
               "superior)")
    z = st.slider("Slice (1 = most inferior)", 1, len(result.masks), logic.default_volume_slice(result) + 1,
                  key="volume-slice", help="Opens on the slice with the largest predicted tumor.") - 1
    for column, (caption, picture) in zip(st.columns(2), logic.volume_views(result, z)):
        column.image(picture, caption=caption, width=300)
    st.subheader("Features per slice")
    st.dataframe(result.slices.round(3), hide_index=True)
    left, right = st.columns(2)
    left.download_button("Download the mask (.nii.gz, the FLAIR's geometry)", logic.mask_download(result),
                         f"{result.name}_mask.nii.gz", "application/gzip")
    right.download_button("Download features (CSV)", logic.csv_bytes(result.slices), "features.csv", "text/csv")


def main() -> None:
    st.title("Lower-grade glioma: tumor segmentation on brain MRI")
    st.caption("Research software, not a medical device: results are not a diagnosis.")
    backend = segmenter()
    with st.sidebar:
        show_model(backend.describe())
    mode = st.radio("Slices from", [UPLOAD, EXAMPLE, SCAN], horizontal=True)
    if mode == SCAN:
        show_scan()
        return
    key, parse = read_inputs(mode)
    try:
        state = analyse(key, parse)
    except Exception as exc:  # noqa: BLE001 - the page keeps working whatever the input
        st.error(f"These inputs could not be processed: {type(exc).__name__}: {exc}")
        return
    for problem in state["problems"]:
        st.error(problem)
    if not state["results"]:
        st.info("Upload .tif/.png slices or a .zip of a patient folder, or pick a bundled example.")
        return
    st.caption("Result produced by " + logic.provenance_line(state["provenance"]))
    show_features(state)
    groups = logic.by_patient(state["results"])
    patient = st.selectbox("Patient", list(groups)) if len(groups) > 1 else next(iter(groups))
    st.subheader(f"Patient {patient}")
    show_slice(groups[patient], patient)
    if len(groups[patient]) > 1:
        show_patient(state, patient, groups[patient])
    if not state["patients"].empty and (state["patients"]["slices"] > 1).any():
        st.subheader("Per-patient volume features")
        show_table(state["patients"], logic.PATIENT_GLOSSARY)
        patients = logic.with_provenance(state["patients"], state["provenance"])
        patients_csv = logic.csv_bytes(patients)
        st.download_button("Download patient features (CSV)", patients_csv, "patients.csv",
                           "text/csv")


main()
