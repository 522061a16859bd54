"""Views: figures and the HTML report, pure functions of results and tables (no model code).

- :mod:`~attnscan.views.palette`: the colours, colour maps, value ranges and type sizes shared by figures and report;
- :mod:`~attnscan.views.grid`: the attention-map grid figure, its rows and which rows to show;
- :mod:`~attnscan.views.profile`: the layer profile figure (with the detection AUROC panel);
- :mod:`~attnscan.views.tradeoff`: the layer-bypass trade-off figure;
- :mod:`~attnscan.views.run_figures`: the figures of a run directory; :mod:`~attnscan.views.saving`: writing them;
- :mod:`~attnscan.views.labels`: readable model labels;
- :mod:`~attnscan.views.report`: the HTML report, from :mod:`~attnscan.views.digest` (the data, with the heatmaps of
  :mod:`~attnscan.views.maps`) and :mod:`~attnscan.views.page` (the document, with the charts of
  :mod:`~attnscan.views.svg` and the text helpers of :mod:`~attnscan.views.formatting`).

matplotlib is imported only inside the functions that draw.
"""
