"""The pack's structure, held in place: ComfyUI's internals only behind nodes/host/, no ComfyUI in
the library, the public names the same in Python and JavaScript, one atomic writer."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_INTERNALS = ("comfy", "comfy_extras", "comfy_execution", "folder_paths", "node_helpers", "server", "execution",
                   "nodes", "latent_preview")


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(absolute module, level) of every import in a file: level 0 for `import x` / `from x import`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def absolute_imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name, level in imported_modules(path) if level == 0}


def test_only_the_host_boundary_imports_comfyui_internals():
    offenders = {}
    for path in (ROOT / "nodes").rglob("*.py"):
        if "host" in path.relative_to(ROOT / "nodes").parts:
            continue
        bad = absolute_imports(path) & set(COMFY_INTERNALS)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}, "node modules must reach ComfyUI through nodes/host/: " + repr(offenders)


# the command line's loader of FLUX files through ComfyUI's own loaders: it imports ComfyUI inside its
# functions only, and is itself imported only when such a load is asked for
OPTIONAL_BOUNDARY = ROOT / "trainer" / "cli" / "comfy_models.py"


def module_level_imports(path: Path) -> set[str]:
    """Absolute modules a file imports when it is itself imported (not inside a function)."""
    found = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0:
                found.add(inner.module or "")
    return found


def test_the_library_never_imports_comfyui():
    comfy = {*COMFY_INTERNALS, "comfy_api"}
    offenders = {str(p.relative_to(ROOT)): sorted(absolute_imports(p) & comfy)
                 for p in (ROOT / "trainer").rglob("*.py") if p != OPTIONAL_BOUNDARY}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert not {m.split(".")[0] for m in module_level_imports(OPTIONAL_BOUNDARY)} & comfy
    for path in (ROOT / "trainer").rglob("*.py"):  # nothing imports the boundary when it is imported itself
        tree = ast.parse(path.read_text(), str(path))
        top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and any(a.name == "comfy_models" for a in n.names)]
        assert not top, path


def test_the_library_never_imports_the_nodes():
    for path in (ROOT / "trainer").rglob("*.py"):
        depth = len(path.relative_to(ROOT / "trainer").parts)  # trainer/x.py: 1
        for name, level in imported_modules(path):
            assert not (level >= depth and name.split(".")[0] == "nodes"), path


def test_node_ids_events_and_routes_agree_between_python_and_javascript():
    spec = importlib.util.spec_from_file_location("pack_ids", ROOT / "nodes" / "ids.py")  # no ComfyUI needed
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    python = {k: v for k, v in vars(module).items() if k.isupper()}
    javascript = (ROOT / "web" / "js" / "ids.js").read_text()
    pairs = dict(re.findall(r"^\s+(\w+): \"([^\"]+)\",$", javascript, re.M))
    sections = dict(re.findall(r"export const (\w+) = \{(.*?)\};", javascript, re.S))
    assert set(sections) == {"NODE", "EVENT", "ROUTE"}
    for section, body in sections.items():
        for name, value in re.findall(r"(\w+): \"([^\"]+)\"", body):
            key = name if section == "NODE" else f"{section}_{name}"
            assert python.get(key) == value, f"ids.js {section}.{name} = {value!r}, ids.py {key} = {python.get(key)!r}"
    assert pairs, "ids.js lists nothing"
    for path in (ROOT / "web" / "js").glob("*.js"):
        if path.name != "ids.js":  # every other script takes the names from ids.js
            text = path.read_text()
            assert not re.search(r"\"(FluxDreamBooth\w+|flux_dreambooth\.(status|progress|checkpoint|samples|rendering|"
                                 r"queued)|/flux_dreambooth/\w+)\"", text), path.name


def test_node_modules_write_no_node_ids_of_their_own():
    for path in (ROOT / "nodes").rglob("*.py"):
        if path.name != "ids.py":
            assert not re.search(r"\"FluxDreamBooth\w+\"", path.read_text()), path


def test_every_file_write_goes_through_the_atomic_writer():
    """No write_text / write_bytes / open(…, 'w') / .save(path) / save_file outside trainer/files.py."""
    writers = re.compile(r"(?<!files)\.write_text\(|\.write_bytes\(|open\([^)]*[\"'][wa]b?[\"']|\bsave_file\(|"
                         r"torch\.save\(|\.save\(\w*(path|tmp|partial)")
    offenders = []
    for folder in ("trainer", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "trainer" / "files.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if writers.search(code) and "files.write_synced" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
