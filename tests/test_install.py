"""The install story: README commands, CI, declared ranges and the two constraint files agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
FAST_MOVING = ("torch", "transformers", "accelerate", "deepspeed", "peft")


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [
        Requirement(text)
        for text in [*project["dependencies"], *extras["video"], *extras["dev"], *extras["lmms"], *extras["serve"]]
    ]


def pins(path: Path) -> dict[str, Version]:
    pinned = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            pinned[canonicalize_name(name)] = Version(version)
    return pinned


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(python3 -m venv .*?)\n```", (REPO / "README.md").read_text())
    assert len(blocks) >= 2, "the README lost its set-up commands"
    return blocks


def test_ci_runs_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    main_job, tests = readme_commands()[:2]
    assert ci_command == tests
    assert tests.endswith("python -m pytest -q -n auto --maxprocesses 4 --dist loadfile")
    assert main_job.endswith("bash scripts/playground/run.sh")
    for command in (main_job, tests):
        installs = re.findall(r"pip install [^&]*", command)
        assert installs and all("-c constraints/tested.txt" in step for step in installs), command


def test_every_dependency_has_an_upper_bound():
    for requirement in declared_requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "<" in operators, f"{requirement} needs a tested lower and an upper bound"


def test_fast_moving_libraries_stop_below_the_next_minor_release():
    for requirement in declared_requirements():
        if requirement.name in FAST_MOVING:
            upper = next(Version(spec.version) for spec in requirement.specifier if spec.operator == "<")
            lower = next(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")
            assert upper.major == lower.major and len(upper.release) == 2, requirement


def test_tested_set_is_inside_the_declared_ranges():
    tested = pins(REPO / "constraints" / "tested.txt")
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in tested, f"{name} is declared but not pinned in constraints/tested.txt"
        assert requirement.specifier.contains(tested[name]), f"tested {name}=={tested[name]} is outside {requirement}"


def test_lowest_set_pins_every_declared_lower_bound():
    lowest = pins(REPO / "constraints" / "lowest.txt")
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        lower = next(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")
        if name in lowest:
            assert requirement.specifier.contains(lowest[name]), (name, lowest[name])
            if name != "torch":  # the one exception, stated in the README: 2.11 ran the GPU benchmarks, not the suite
                assert lowest[name].release[:2] == lower.release[:2], f"{name}: lowest.txt and pyproject disagree"
    for requirement in declared_requirements():
        assert canonicalize_name(requirement.name) in lowest, f"constraints/lowest.txt must pin {requirement.name}"
