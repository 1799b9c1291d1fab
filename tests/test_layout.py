"""The engine is importable without Dagster; the code location loads."""

import subprocess
import sys

ENGINE_MODULES = ["dsdm", "dsdm.ingest", "dsdm.tokenization", "dsdm.tasks", "dsdm.store",
                  "dsdm.lineage"]


def test_engine_never_imports_dagster() -> None:
    code = (
        "import importlib, pkgutil, sys, dsdm\n"
        "for m in pkgutil.iter_modules(dsdm.__path__): importlib.import_module('dsdm.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_definitions_load_with_the_main_job() -> None:
    from dsdm_assets.definitions import defs

    job = defs.resolve_job_def("selection_job")
    assert {"documents", "tokenized_corpus", "target_tasks"} <= {
        k.to_user_string() for k in job.asset_layer.executable_asset_keys
    }
