"""The clinicians' web page (``brainseg app``): upload slices or a patient zip, see the tumor
and its features.

``logic`` holds the pure parts (parsing uploads, the segmenter backends, tables, summaries);
``page`` is the thin Streamlit script; ``launch`` starts ``streamlit run`` on it.
"""
