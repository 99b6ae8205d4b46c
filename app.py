"""qlab dashboard entry point: it only routes. `streamlit run app.py` (or `make run`)."""

import streamlit as st

PAGES = {
    "Answer": [st.Page("pages/overview.py", title="Overview", icon=":material/verified:", default=True)],
    "Your model": [
        st.Page("pages/model.py", title="Model", icon=":material/memory:"),
        st.Page("pages/quantize.py", title="Quantize", icon=":material/tune:"),
        st.Page("pages/weights.py", title="Weights", icon=":material/bar_chart:"),
        st.Page("pages/sensitivity.py", title="Sensitivity", icon=":material/grid_on:"),
    ],
    "Deploy": [
        st.Page("pages/memory.py", title="Memory", icon=":material/memory_alt:"),
        st.Page("pages/speed.py", title="Speed", icon=":material/speed:"),
    ],
    "Runs": [st.Page("pages/history.py", title="History", icon=":material/history:")],
    "Learn": [
        st.Page("pages/formats.py", title="Formats", icon=":material/pin:"),
        st.Page("pages/concepts.py", title="Concepts", icon=":material/school:"),
    ],
}


def main() -> None:
    st.set_page_config(page_title="qlab: which precision should I ship?", layout="wide")
    st.navigation(PAGES).run()


main()
