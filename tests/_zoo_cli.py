"""A zoo model through the CLI as a user runs it: plan, quantize, export (the slow zoo export tests)."""

import json

from click.testing import CliRunner


def plan_quantize_export(entry: str, tmp_path) -> tuple[dict, str]:
    """Build ``entry`` (cached), then ``plan`` (2.5 bits {3,2}, g32), ``quantize`` into ``tmp_path/q`` and ``export``
    to .pte and .onnx with the default modes into ``tmp_path/ex``; returns the export report and the export's output."""
    from moe_export.cli import main
    from moe_export.zoo import build

    zdir = build(entry, seed=0, progress=False)
    run = CliRunner()
    for args in (["plan", str(zdir), "--avg-bits", "2.5", "--levels", "3,2", "--group-size", "32", "-q", "-o",
                  str(tmp_path / "plan.json")],
                 ["quantize", str(zdir), "--plan", str(tmp_path / "plan.json"), "-q", "-o", str(tmp_path / "q")],
                 ["export", str(tmp_path / "q"), "--to", "pte,onnx", "--no-latency", "-q", "-o", str(tmp_path / "ex")]):
        res = run.invoke(main, args)
        assert res.exit_code == 0, (args[0], res.output)
    return json.loads((tmp_path / "ex" / "export_report.json").read_text()), res.output
