"""The commands in README.md and docs/*.md are ones the code accepts.

Every shell command that starts one of our entry points, in a fenced block (bash, sh,
console or plain) or an inline code span, is taken apart (continuations, env-var
prefixes, ``&&``/pipes, comments, heredocs), and each ``--flag`` it shows is looked up in
the option list that the real program prints for ``--help`` (run once per distinct
program, in a subprocess, so the check sees what a user sees; abbreviations that argparse
would accept are refused, docs should spell flags out). Launchers are checked too: ``deepspeed``/``torchrun``
flags against their own ``--help``, then the script or module they start. ``make``
targets must exist in the Makefile.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

CONSOLE_SCRIPTS = {"lvvit-shards", "lvvit-label", "lvvit-export", "lvvit-serve", "lvvit-bench"}
WITH_SUBCOMMAND = {"lvvit-shards", "lvvit-bench", "lvvit-label"}  # lvvit-label: dense-teacher
LAUNCHERS = {"deepspeed", "torchrun"}
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "shell-session"}
PREFIXES = {"env", "time", "nohup", "exec", "sudo"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", "<<", ">&", "&>", "<<<", ">|"}
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
ENV_ASSIGN = re.compile(r"^[A-Za-z_]\w*=")
OUR_MODULE = re.compile(r"^lvvit(\.\w+)+$")
CHOICES = re.compile(r"\{([\w-]+(?:,[\w-]+)+)\}")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
OPTION_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")


@dataclass(frozen=True)
class DocCommand:
    """One program invocation shown in a doc: ``program`` says how to ask it for --help."""

    where: str  # "docs/imagenet.md:42"
    program: tuple[str, ...]  # ("lvvit-shards", "build"), ("python", "train.py"), ("make",)
    args: tuple[str, ...]

    @property
    def flags(self) -> list[str]:
        return [a.split("=", 1)[0] for a in self.args if a.startswith("--") and a != "--"]


# ------------------------------------------------------------------ extraction
def shell_lines(markdown: str, name: str) -> list[tuple[str, str]]:
    """``(where, logical line)`` of every shell block (prompts and continuations resolved,
    heredoc bodies dropped: they are input, not commands) and of every inline code span."""
    out: list[tuple[str, str]] = []
    fence, lang, pending, start, heredoc_end = "", "", "", 0, None
    for number, raw in enumerate(markdown.splitlines(), 1):
        match = FENCE.match(raw)
        if not fence:
            if match:
                fence, lang = match.group(1), match.group(2).lower()
            else:
                out.extend((f"{name}:{number}", span) for span in INLINE_CODE.findall(raw))
            continue
        if match and raw.strip().startswith(fence) and not match.group(2):
            fence, pending = "", ""
            continue
        if lang not in SHELL_LANGS:
            continue
        line = raw.strip()
        if heredoc_end is not None:
            heredoc_end = None if line == heredoc_end else heredoc_end
            continue
        if not pending:
            if lang in {"console", "shell-session"}:
                if not line.startswith("$ "):
                    continue  # output, not a command
                line = line[2:]
            start = number
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append((f"{name}:{start}", pending))
        found = HEREDOC.search(pending)
        heredoc_end = found.group(1) if found else None
        pending = ""
    return out


def split_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on a line (``a && b | c`` -> three), with
    comments, redirections and their targets removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            commands.append([])
        elif token in REDIRECTS or (token.endswith((">", "<")) and set(token) <= set("<>&|0123456789")):
            skip_next = True
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def invocations(words: list[str], where: str) -> list[DocCommand]:
    """The DocCommands of one simple command; empty when it starts none of ours."""
    while words and (ENV_ASSIGN.match(words[0]) or words[0] in PREFIXES):
        words = words[1:]
    if not words:
        return []
    exe = Path(words[0]).name
    rest = words[1:]
    if exe in CONSOLE_SCRIPTS:
        if exe in WITH_SUBCOMMAND and rest and not rest[0].startswith("-") and not rest[0].isupper():
            choices = CHOICES.fullmatch(rest[0])  # `lvvit-bench {data,train}`: each of them
            subs = choices.group(1).split(",") if choices else [rest[0]]
            return [DocCommand(where, (exe, sub), tuple(rest[1:])) for sub in subs]
        return [DocCommand(where, (exe,), tuple(rest))]
    if exe == "make":
        return [DocCommand(where, ("make",), tuple(rest))]
    if exe.startswith("python"):
        if rest[:1] == ["-m"] and len(rest) > 1 and OUR_MODULE.match(rest[1]):
            return [DocCommand(where, ("python", "-m", rest[1]), tuple(rest[2:]))]
        if rest and Path(rest[0]).name == "train.py":
            return [DocCommand(where, ("python", "train.py"), tuple(rest[1:]))]
        return []
    if exe in LAUNCHERS:
        for i, word in enumerate(rest):
            if Path(word).name == "train.py":
                target: tuple[str, ...] = ("python", "train.py")
            elif OUR_MODULE.match(word) and i and rest[i - 1] in {"--module", "-m"}:
                target = ("python", "-m", word)
            else:
                continue
            return [DocCommand(where, (exe,), tuple(rest[:i])), DocCommand(where, target, tuple(rest[i + 1 :]))]
        return []
    return []


def doc_commands(markdown: str, name: str) -> list[DocCommand]:
    found: list[DocCommand] = []
    for where, line in shell_lines(markdown, name):
        try:
            commands = split_commands(line)
        except ValueError as exc:  # unbalanced quotes: fine in output, not in our commands
            if invocations(line.split(), where):
                raise ValueError(f"{where}: cannot parse `{line}`: {exc}") from None
            continue
        for words in commands:
            found.extend(invocations(words, where))
    return found


# ------------------------------------------------------------------ the real programs
# Each program's own file runs with ``--help`` exactly as its command line would run it
# (the console-script wrapper in the venv's bin/, train.py, ``python -m``), but all of them
# in one interpreter: importing torch once instead of once per program keeps this fast.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = []
for entry in json.load(sys.stdin):
    sys.argv = entry["argv"]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            if entry["module"]:
                runpy.run_module(entry["module"], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(entry["argv"][0], run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:
            code, _ = 1, stderr.write(f"{type(exc).__name__}: {exc}")
    out.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
sys.__stdout__.write(json.dumps(out))
"""


class HelpFailed(Exception):
    """The program (or subcommand) shown in a doc does not answer ``--help``."""


def help_entry(program: tuple[str, ...]) -> dict:
    """What the runner executes for ``program --help``, and the command a user would type."""
    head, *tail = program
    if head in CONSOLE_SCRIPTS or head in LAUNCHERS:
        return {"argv": [str(BIN / head), *tail, "--help"], "module": None}
    if program == ("python", "train.py"):
        return {"argv": [str(REPO / "train.py"), "--help"], "module": None}
    return {"argv": [tail[1], "--help"], "module": tail[1]}  # python -m MODULE


def run_helps(programs: list[tuple[str, ...]]) -> dict[tuple[str, ...], dict]:
    entries = [help_entry(p) for p in programs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER], input=json.dumps(entries), capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, f"the --help runner failed: {proc.stderr[-3000:]}"
    return dict(zip(programs, json.loads(proc.stdout), strict=True))


_HELP: dict[tuple[str, ...], dict] = {}


def accepted_options(program: tuple[str, ...]) -> frozenset[str]:
    if program not in _HELP:
        _HELP.update(run_helps([program]))
    result, shown = _HELP[program], " ".join(program) + " --help"
    if result["code"] != 0:
        raise HelpFailed(f"`{shown}` failed ({result['code']}): {result['stderr'].strip()[-1500:]}")
    options = parse_options(result["stdout"])
    if "--help" not in options:
        raise HelpFailed(f"`{shown}` printed no argparse option list")
    return frozenset(options)


def parse_options(help_text: str) -> set[str]:
    """Option strings from argparse's option listing (lines indented by exactly two
    spaces that start with a dash), not from prose that may name other tools' flags."""
    options: set[str] = set()
    for line in help_text.splitlines():
        match = OPTION_LINE.match(line)
        if match:
            options.update(re.findall(r"(?<![\w-])--?[A-Za-z0-9][\w-]*", match.group(1)))
    return options


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for line in re.findall(r"^([\w .-]+):(?!=)", text, re.M) for t in line.split()}


def needs_help(cmd: DocCommand) -> bool:
    """False for make, and for a bare ``lvvit-bench NAME`` (a placeholder: nothing to check)."""
    bare = len(cmd.program) == 1 and cmd.program[0] in WITH_SUBCOMMAND and not cmd.flags
    return cmd.program != ("make",) and not bare


def problems(cmd: DocCommand) -> list[str]:
    if cmd.program == ("make",):
        targets = [a for a in cmd.args if not a.startswith("-") and "=" not in a]
        return [f"make target '{t}' is not in the Makefile" for t in targets if t not in make_targets()]
    if not needs_help(cmd):
        return []
    try:
        known = accepted_options(cmd.program)
    except HelpFailed as exc:
        return [str(exc)]
    return [f"`{' '.join(cmd.program)}` has no option {flag}" for flag in cmd.flags if flag not in known]


ALL = [c for path in DOCS for c in doc_commands(path.read_text(), str(path.relative_to(REPO)))]


@pytest.fixture(scope="module", autouse=True)
def _all_helps_at_once() -> None:
    _HELP.update(run_helps(sorted({c.program for c in ALL if needs_help(c)})))


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.where} {' '.join(c.program)}" for c in ALL])
def test_documented_command_is_accepted(cmd: DocCommand) -> None:
    found = problems(cmd)
    assert not found, f"{cmd.where}: {'; '.join(found)}\n  {shlex.join([*cmd.program, *cmd.args])}"


def test_docs_show_every_entry_point() -> None:
    """Guards the extractor as much as the docs: if it silently found nothing, the test
    above would pass vacuously."""
    shown = {c.program[:2] if c.program[0] in WITH_SUBCOMMAND else c.program for c in ALL}
    expected = {("lvvit-shards", "build"), ("lvvit-label",), ("lvvit-export",), ("lvvit-serve",),
                ("python", "train.py"), ("deepspeed",), ("python", "-m", "lvvit.demo"), ("make",)}
    assert expected <= shown, f"not shown in any doc: {expected - shown}"
    imagenet = [c for c in ALL if c.where.startswith("docs/imagenet.md")]
    assert len(imagenet) >= 10


SAMPLE = """\
Prose with `lvvit-serve --inline-flag`, `lvvit-bench NAME` and `lvvit-bench {data,nope}`.

```bash
# a comment --not-a-flag
OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --bogus-launcher train.py \\
    --model lvvit_t --img-size=64 \\
    --no-such-train-flag   # trailing comment --nor-this
lvvit-shards build imgs --out shards && lvvit-serve --model-dir x --made-up-flag | tee log
python - <<'EOF'
lvvit-export --inside-heredoc
EOF
make demo nothere TORCH_SPEC=torch
```

```console
$ lvvit-bench infer --batches 1,8
lvvit-export --output-line-not-a-command
```

```python
lvvit_export = "--not-shell"
```
"""


def test_extractor_finds_commands_flags_and_places() -> None:
    cmds = doc_commands(SAMPLE, "x.md")
    got = [(c.where, c.program, c.flags) for c in cmds]
    assert got == [
        ("x.md:1", ("lvvit-serve",), ["--inline-flag"]),
        ("x.md:1", ("lvvit-bench",), []),
        ("x.md:1", ("lvvit-bench", "data"), []),
        ("x.md:1", ("lvvit-bench", "nope"), []),
        ("x.md:5", ("deepspeed",), ["--num_gpus", "--bogus-launcher"]),
        ("x.md:5", ("python", "train.py"), ["--model", "--img-size", "--no-such-train-flag"]),
        ("x.md:8", ("lvvit-shards", "build"), ["--out"]),
        ("x.md:8", ("lvvit-serve",), ["--model-dir", "--made-up-flag"]),
        ("x.md:12", ("make",), []),
        ("x.md:16", ("lvvit-bench", "infer"), ["--batches"]),
    ]
    assert cmds[8].args == ("demo", "nothere", "TORCH_SPEC=torch")


def test_checker_rejects_flags_the_cli_lacks() -> None:
    """The made-up flags are caught, the real ones pass, against the real --help."""
    cmds = doc_commands(SAMPLE, "x.md")
    reports = [problems(c) for c in cmds]
    nope = reports.pop(3)
    assert len(nope) == 1 and "invalid choice: 'nope'" in nope[0]
    assert reports == [
        ["`lvvit-serve` has no option --inline-flag"],
        [],
        [],
        ["`deepspeed` has no option --bogus-launcher"],
        ["`python train.py` has no option --no-such-train-flag"],
        [],
        ["`lvvit-serve` has no option --made-up-flag"],
        ["make target 'nothere' is not in the Makefile"],
        [],
    ]


def test_program_without_an_option_list_is_reported() -> None:
    """A module that prints no argparse options (here: not a CLI at all) is not taken as
    accepting everything."""
    report = problems(DocCommand("x.md:1", ("python", "-m", "lvvit.train.loss"), ("--model",)))
    assert report == ["`python -m lvvit.train.loss --help` printed no argparse option list"]
