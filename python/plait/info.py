"""What this installation of plait has and can use, for ``plait info``.

``collect_info()`` returns a JSON-ready dict; ``format_info()`` renders it for people.
Each probe reports its own failure as text instead of raising, because a half-broken
installation is exactly when someone runs ``plait info``.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def _plait_version() -> str | None:
    try:
        return importlib.metadata.version("plait")
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return _error(exc)
    available = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
    return {"version": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": available, "devices": devices}


def triton_version() -> str | None:
    """Triton's version, or None where it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _extension_info() -> dict[str, Any]:
    try:
        from plait import _C
    except ImportError as exc:
        return _error(exc)
    return {"build": dict(_C.build_info()), "cuda_device_count": _C.cuda_device_count()}


def _backends() -> dict[str, Any]:
    try:
        from plait.comm import available_backends

        return {name: {"usable": bool(usable), "reason": str(reason)}
                for name, (usable, reason) in available_backends().items()}
    except Exception as exc:  # comm is plait's own code: show its failure, keep reporting the rest
        return _error(exc)


def collect_info() -> dict[str, Any]:
    """Versions, devices, the compiled extension's build facts and the usable comm backends."""
    return {
        "plait": _plait_version(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": _torch_info(),
        "triton": triton_version(),
        "extension": _extension_info(),
        "backends": _backends(),
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of collect_info()'s result."""
    lines = [f"plait      {info['plait'] or 'not installed as a distribution'}",
             f"python     {info['python']} ({info['platform']})"]
    torch = info["torch"]
    if "error" in torch:
        lines.append(f"torch      unusable: {torch['error']}")
    else:
        lines.append(f"torch      {torch['version']} (CUDA build: {torch['cuda_build'] or 'none'}, "
                     f"CUDA available: {'yes' if torch['cuda_available'] else 'no'})")
        lines += [f"  cuda:{i}   {name}" for i, name in enumerate(torch["devices"])]
    lines.append(f"triton     {info['triton'] or 'not installed'}")

    extension = info["extension"]
    if "error" in extension:
        lines.append(f"plait._C   unusable: {extension['error']}")
    else:
        lines.append("plait._C")
        build = dict(extension["build"], cuda_device_count=extension["cuda_device_count"])
        width = max(map(len, build))
        lines += [f"  {key:<{width}}  {_show(value)}" for key, value in build.items()]

    backends = info["backends"]
    if "error" in backends:
        lines.append(f"backends   cannot list: {backends['error']}")
    else:
        lines.append("backends")
        width = max(map(len, backends), default=0)
        lines += [f"  {name:<{width}}  {'usable' if b['usable'] else 'unusable'}: {b['reason']}"
                  for name, b in backends.items()]
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)
