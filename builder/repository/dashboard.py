"""The Grafana dashboard of a served repository, built with grafana-foundation-sdk from the recorded series.

Every panel reads a recording rule of `builder.repository.monitoring` by name, so the dashboard, the alerts and the
autoscaler show the same numbers.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple
import json

from builder.errors import BuilderError
from builder.repository import monitoring as M

UID = "swin-triton"
DATASOURCE_UID = "prometheus"  # the provisioned datasource's uid (monitoring.render)


def _panel(title: str, description: str, queries: Sequence[Tuple[str, str]], unit: str, stacked: bool = False):
    """A time series panel: (PromQL, legend) per line."""
    from grafana_foundation_sdk.builders import common, prometheus, timeseries
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

    panel = (timeseries.Panel().title(title).description(description).unit(unit).height(8).span(12)
             .datasource(dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID))
             .legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                     .placement(cm.LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "max"])))
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + index)))
    return panel


def panels(models: Sequence[str], ensemble: str, classifier: str) -> List[Tuple[str, List]]:
    """(row title, panels) of the dashboard, in order."""
    by_model = M.model_matcher(models)

    def per_model(series: str, scale: str = "") -> List[Tuple[str, str]]:
        return [(f"avg by (model) ({series}{by_model}){scale}", "{{model}}")]

    def summed(series: str) -> List[Tuple[str, str]]:
        return [(f"sum by (model) ({series}{by_model})", "{{model}}")]

    return [
        ("Traffic", [
            _panel("Requests per second", "Successful requests, per model, over all servers.", summed(M.REQUESTS),
                   "reqps"),
            _panel("Images per second", "Images classified (batch items), per model.", summed(M.IMAGES), "short"),
            _panel("Failed requests", "Share of requests that failed (rejected at a full queue, cancelled, or "
                   "failed in the model).", per_model(M.FAILURE_RATIO), "percentunit"),
            _panel("Images per execution", "How full the batches are: images per model execution.",
                   per_model(M.BATCH), "short"),
        ]),
        ("Where a request's time goes", [
            _panel("The photo path against the classifier",
                   f"A request to {ensemble}, whole, beside the classifier's queue and compute inside it.",
                   [(f'avg({M.REQUEST_US}{{model="{ensemble}"}}) / 1000', f"{ensemble}: whole request"),
                    (f'avg({M.QUEUE_US}{{model="{classifier}"}}) / 1000', "classifier: queue"),
                    (f'avg({M.COMPUTE_US}{{model="{classifier}"}}) / 1000', "classifier: compute")], "ms"),
            _panel("Queue time per request", "Time a request waited for an instance, per model.",
                   per_model(M.QUEUE_US, " / 1000"), "ms"),
            _panel("Compute time per request", "The time of the execution each request rode in (input, "
                   "inference, output), per model.", per_model(M.COMPUTE_US, " / 1000"), "ms"),
            _panel("Request time per request", "From arrival to response inside the server, per model.",
                   per_model(M.REQUEST_US, " / 1000"), "ms"),
        ]),
        ("GPU", [
            _panel("GPU utilisation", "Per GPU, averaged over the rate window.",
                   [(f"{M.GPU_UTILIZATION}", "{{gpu_uuid}}")], "percentunit"),
            _panel("GPU memory used", "Per GPU: used over total.", [(f"{M.GPU_MEMORY}", "{{gpu_uuid}}")],
                   "percentunit"),
        ]),
    ]


def dashboard(models: Sequence[str], ensemble: str, classifier: str) -> str:
    """The dashboard as Grafana's JSON model, as the file's text.

    Raises:
        BuilderError: grafana-foundation-sdk is not installed (one line that says how to get it).
    """
    try:
        import grafana_foundation_sdk  # noqa: F401  (checked here: the panels import it too)
    except ImportError:
        raise BuilderError("monitoring: the Grafana dashboard is built with grafana-foundation-sdk, which this "
                           "Python lacks; install the project's packages (`make venv`, or pip install the "
                           "version pyproject.toml pins)") from None
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    board = (db.Dashboard(f"Swin on Triton: {ensemble}").uid(UID).tags(["triton", "swin"]).refresh("10s")
             .time("now-30m", "now").timezone("browser"))
    for title, row_panels in panels(models, ensemble, classifier):
        board = board.with_row(db.Row(title))
        for panel in row_panels:
            board = board.with_panel(panel)
    return json.dumps(board.build(), cls=JSONEncoder, indent=2) + "\n"
