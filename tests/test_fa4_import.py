"""runtime/lazy_imports (how runtime/fa4 imports FlashAttention-4): a package registered without
running its __init__ imports the submodules asked of it alone and runs the __init__ the first time
a name it binds is asked for."""
from __future__ import annotations

import subprocess
import sys
import textwrap

PACKAGE = {
    "__init__.py": """
        import sys
        from lazypkg.heavy import tool
        from lazypkg.light import helper as light_helper
        from lazypkg.tool2 import tool2
        sys.modules["lazypkg.init_ran"] = True
        VERSION = "1"
        def function():
            return "from init"
        class Thing:
            pass
    """,
    "light.py": "def helper():\n    return 'light'\n",
    "tool2.py": "def tool2():\n    return 'tool2'\n",
    "heavy.py": "import sys\nsys.modules['lazypkg.heavy_ran'] = True\ndef tool():\n    return 'tool'\n",
    "other.py": "X = 3\n",
}

CHILD = """
import sys
from attncc.runtime.lazy_imports import register_lazily
assert register_lazily("lazypkg")
assert not register_lazily("no_such_package_here")
from lazypkg import light, other          # submodules: imported alone
import lazypkg.other as also
assert light.helper() == "light" and other.X == 3 and also is other
assert "lazypkg.init_ran" not in sys.modules and "lazypkg.heavy_ran" not in sys.modules
from lazypkg import {asked}               # a name the __init__ binds: it runs once
assert sys.modules["lazypkg.init_ran"] is True and sys.modules["lazypkg.heavy_ran"] is True
import lazypkg
assert lazypkg.function() == "from init" and lazypkg.tool() == "tool" and lazypkg.VERSION == "1"
assert lazypkg.light_helper() == "light"
try:
    lazypkg.missing_name
except AttributeError as e:
    assert "missing_name" in str(e)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""


SUBMODULE_FIRST = """
import sys, types
from attncc.runtime.lazy_imports import register_lazily
assert register_lazily("lazypkg")
import lazypkg.tool2                      # a submodule under a name the __init__ rebinds to a function
assert sys.modules["lazypkg.init_ran"] is True
from lazypkg import tool2
assert not isinstance(tool2, types.ModuleType) and tool2() == "tool2"
print("ok")
"""


def _write_package(root, files: dict) -> None:
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))


def _child_says_ok(code: str, path) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_registered_package_runs_its_init_only_when_needed(tmp_path):
    _write_package(tmp_path / "lazypkg", PACKAGE)
    for asked, code in (("function", CHILD), ("VERSION", CHILD), ("Thing", CHILD), ("tool", CHILD),
                        ("tool2", SUBMODULE_FIRST)):
        _child_says_ok(code.format(asked=asked), tmp_path)
