"""data.csv: genomic clusters, clinical fields and ``death01`` per patient."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

TARGET = "death01"
ID = "Patient"
# The public data.csv's columns (all integer codes except age); the synthetic generator writes the same.
CLINICAL_COLUMNS = [
    "RNASeqCluster", "MethylationCluster", "miRNACluster", "CNCluster", "RPPACluster",
    "OncosignCluster", "COCCluster", "histological_type", "neoplasm_histologic_grade",
    "tumor_tissue_site", "laterality", "tumor_location", "gender", "age_at_initial_pathologic",
    "race", "ethnicity",
]
CONTINUOUS_COLUMNS = ["age_at_initial_pathologic"]


class ClinicalError(ValueError):
    """data.csv cannot be used; the message names the file and the column."""


def read_clinical(path: Path) -> pd.DataFrame:
    """Read data.csv (comma- or semicolon-separated) indexed by ``Patient``.

    Checks the ``Patient`` column exists and is unique, and that the known code columns that are
    present are numeric (a non-numeric code raises, naming the column and a bad value).
    """
    path = Path(path)
    if not path.is_file():
        raise ClinicalError(f"{path}: data.csv not found")
    head = path.read_text(errors="replace")[:4096]
    if not head.strip():
        raise ClinicalError(f"{path}: empty file")
    try:
        sep = csv.Sniffer().sniff(head.splitlines()[0], delimiters=",;").delimiter
    except csv.Error:
        sep = ","
    df = pd.read_csv(path, sep=sep)
    df.columns = [str(c).strip() for c in df.columns]
    if ID not in df.columns:
        raise ClinicalError(f"{path}: no {ID!r} column (columns: {', '.join(df.columns[:8])})")
    df[ID] = df[ID].astype(str).str.strip()
    dups = df[ID][df[ID].duplicated()].tolist()
    if dups:
        raise ClinicalError(f"{path}: patient(s) listed twice: {', '.join(dups[:5])}")
    for col in [c for c in CLINICAL_COLUMNS + [TARGET] if c in df.columns]:
        if df[col].dtype == object or str(df[col].dtype).startswith("str"):
            converted = pd.to_numeric(df[col].astype(str).str.replace(",", ".").str.strip()
                                      .replace({"": None, "nan": None, "NA": None}), errors="coerce")
            bad = df[col][converted.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")]
            if len(bad):
                raise ClinicalError(f"{path}: column {col!r} has non-numeric value {bad.iloc[0]!r} "
                                    f"(patient {df.loc[bad.index[0], ID]})")
            df[col] = converted
    return df.set_index(ID)
