"""Reports (layer L5): markdown and plots rendered from the typed results of the compute modules.

One module per job (:mod:`.verify`, :mod:`.trust_region`, :mod:`.positions`, :mod:`.fidelity`,
:mod:`.ablate`) and :mod:`.common` with the pieces they share: the one markdown table
formatter (:func:`markdown_table`), the one history plot (:func:`history_plot`), JSON result
files (:func:`write_json`, through :func:`currsearch.results.to_json`). Compute modules never
import this package.
"""

from .common import fmt, history_plot, json_safe, markdown_table, pyplot, save_figure, study_history_plot, to_json, write_json, write_result_files

__all__ = ["fmt", "history_plot", "json_safe", "markdown_table", "pyplot", "save_figure", "study_history_plot", "to_json", "write_json",
           "write_result_files"]
