"""Deciding before building: what this machine is and which models fit it (``slmforge doctor``), and whether
owning the model pays off against an API (``slmforge roi``).

    from slmforge.sizing import probe, measure, preset_shape, model_shape, fit, fit_table
    hw = measure(probe())
    print(fit_table([fit(preset_shape(p), hw) for p in ("nano", "micro", "small", "base")]))

    from slmforge.sizing import RoiInputs, roi_report
    print(roi_report(RoiInputs(tokens_per_s=120))["break_even_month"])
"""

from __future__ import annotations

from slmforge.sizing.fit import (
    PRECISIONS,
    Fit,
    ModelShape,
    as_dicts,
    fit,
    fit_table,
    measured_check,
    model_shape,
    predict_decode,
    preset_shape,
)
from slmforge.sizing.hardware import Gpu, Hardware, bandwidth_gbs, matmul_gflops, measure, probe
from slmforge.sizing.roi import (
    RoiInputs,
    break_even_month,
    break_even_volume,
    machines_needed,
    monthly,
    plot as roi_plot,
    report as roi_report,
    table as roi_table,
)

__all__ = [
    "Hardware", "Gpu", "probe", "measure", "bandwidth_gbs", "matmul_gflops",
    "ModelShape", "Fit", "PRECISIONS", "preset_shape", "model_shape", "fit", "fit_table", "as_dicts",
    "predict_decode", "measured_check",
    "RoiInputs", "monthly", "machines_needed", "break_even_month", "break_even_volume", "roi_report", "roi_plot",
    "roi_table",
]
