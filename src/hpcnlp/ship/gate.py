"""The judging: measurements (hpcnlp.ship.measure) and thresholds (validate's ValidationThresholds) ->
one row per check: {check, measured, limit, passed}. A model ships when every row passed."""

from __future__ import annotations

from hpcnlp.ship.edge_cases import edge_summary


def int8_checks(m: dict, th, primary: str | None) -> list[dict]:
    """The int8 rows of the gate for one recipe's measurements; the recipe search judges with the same rows.
    Agreement on the whole eval set, not the parity sample: at 0.97, one flip in 32 would already fail."""
    rows = [
        {
            "check": "int8 argmax agreement (eval set)",
            "measured": m["argmax_agreement"],
            "limit": f">= {th.int8_min_argmax_agreement:g}",
            "passed": m["argmax_agreement"] >= th.int8_min_argmax_agreement,
        },
        {
            "check": "int8 argmax agreement (edge cases)",
            "measured": m["edge_argmax_agreement"],
            "limit": f">= {th.int8_min_argmax_agreement:g}",
            "passed": m["edge_argmax_agreement"] >= th.int8_min_argmax_agreement,
        },
    ]
    if primary:
        rows.append(
            {
                "check": f"int8 {primary} drop vs PyTorch",
                "measured": m["metric_drop"],
                "limit": f"<= {th.int8_max_metric_drop:g}",
                "passed": m["metric_drop"] <= th.int8_max_metric_drop,
            }
        )
    return rows


def gate(results: dict, th, primary: str | None) -> list[dict]:
    """Every threshold as a row: check, measured, limit, passed."""
    fp32 = results["parity"]["onnx_fp32"]
    rows = [
        {
            "check": f"fp32 max abs diff ({name})",
            "measured": v,
            "limit": f"<= {th.fp32_atol:g}",
            "passed": v <= th.fp32_atol,
        }
        for name, v in fp32["max_abs_diff"].items()
    ]
    rows.append(
        {
            "check": "fp32 argmax agreement",
            "measured": fp32["argmax_agreement"],
            "limit": f">= {th.fp32_min_argmax_agreement:g}",
            "passed": fp32["argmax_agreement"] >= th.fp32_min_argmax_agreement,
        }
    )
    if "edge_cases" in results:
        edge = edge_summary([c["onnx_fp32"] for c in results["edge_cases"]])
        rows += [
            {
                "check": "edge cases: fp32 max abs diff (logits)",
                "measured": edge["max_abs_diff"],
                "limit": f"<= {th.fp32_atol:g}",
                "passed": edge["max_abs_diff"] <= th.fp32_atol,
            },
            {
                "check": "edge cases: fp32 argmax agreement",
                "measured": edge["argmax_agreement"],
                "limit": f">= {th.fp32_min_argmax_agreement:g}",
                "passed": edge["argmax_agreement"] >= th.fp32_min_argmax_agreement,
            },
        ]
        errors = [
            f"{k}: {c['case']}"
            for c in results["edge_cases"]
            for k, v in c.items()
            if isinstance(v, dict) and "error" in v
        ]
        if errors:
            rows.append(
                {
                    "check": "edge cases: ONNX runs every input",
                    "measured": "; ".join(errors),
                    "limit": "no error",
                    "passed": False,
                }
            )
    int8 = results.get("int8")
    if int8 and int8["recipe"]:
        rows += int8_checks(int8["attempts"][-1], th, primary)  # the search stops at the recipe that passed
    elif int8:
        rows.append(
            {
                "check": "int8: a recipe within the limits",
                "measured": int8["reason"],
                "limit": f"int8_fallback: {th.int8_fallback}",
                "passed": th.int8_fallback == "fp32",
            }
        )
    return rows
