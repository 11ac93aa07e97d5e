"""The operator never imports torch; the trainer never imports kopf or kubernetes."""

import pkgutil
import subprocess
import sys

import sft_operator
import sft_trainer


def _modules(package, skip=()):
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
            if not any(m.name.startswith(s) for s in skip)]


def _imported_after(modules):
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "print(' '.join(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'kopf', 'kubernetes'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_operator_package_never_imports_torch():
    loaded = _imported_after(_modules(sft_operator))
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "transformers")}


def test_trainer_contract_modules_are_light():
    loaded = _imported_after(["sft_trainer", "sft_contract.spec", "sft_contract.exit_codes", "sft_contract.memory",
                              "sft_trainer.fetch", "sft_trainer.paths"])
    assert not loaded


def test_trainer_package_never_imports_kopf_or_kubernetes():
    loaded = _imported_after(_modules(sft_trainer, skip=("sft_trainer.__main__",)))
    assert not {m for m in loaded if m.split(".")[0] in ("kopf", "kubernetes")}
