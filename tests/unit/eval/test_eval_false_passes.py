"""No false passes: a program that exits 0 without its tests having run, or whose output was cut
at its cap, is not a pass. Each case below was scored `passed` when the verdict was the exit
status alone; a pass now needs the completion marker the harness prints after the last test."""

from __future__ import annotations

import pytest

from eval_testing import require_toolchain, requires_humaneval_x
from mft_core.eval.assemble import assemble_program
from mft_core.eval.execute import FAILURE_REASONS
from mft_core.eval.problems import load_problems

pytestmark = requires_humaneval_x

# Completions of problem 0 (has_close_elements) that stop the program with status 0 before any
# assertion ran, or read the marker's descriptor themselves (the harness read it first: empty).
EARLY_EXITS = {
    "python": {
        "os._exit": "    import os\n    os._exit(0)\n",
        "posix._exit": "    import posix\n    posix._exit(0)\n",
        "sys.exit": "    import sys\n    sys.exit(0)\n",  # a SystemExit inside check()
        "steals fd 3": "    import os, sys\n    sys.stdout.write(os.read(3, 256).decode() + '\\n')\n    os._exit(0)\n",
    },
    "cpp": {
        "_exit": "    _exit(0);\n}\n",
        "exit": "    exit(0);\n}\n",
        "steals fd 3": ("    char b[256]; long n = read(3, b, 256); if (n > 0) write(1, b, n);\n"
                        "    write(1, \"\\n\", 1); _exit(0);\n}\n"),
    },
    "java": {
        "System.exit": "        System.exit(0);\n        return true;\n    }\n}\n",
        "Runtime.halt": "        Runtime.getRuntime().halt(0);\n        return true;\n    }\n}\n",
    },
    "js": {
        "process.exit": "  process.exit(0)\n}\n",
        "steals fd 3": "  console.log(require('fs').readFileSync(3).toString()); process.exit(0)\n}\n",
    },
    "go": {
        "os.Exit": "    os.Exit(0)\n    return false\n}\n",
        "steals fd 3": ("    b := make([]byte, 256)\n    n, _ := os.NewFile(3, \"x\").Read(b)\n"
                        "    fmt.Println(\"PASS\")\n    fmt.Println(string(b[:n]))\n    os.Exit(0)\n    return false\n}\n"),
    },
}
CASES = [(language, name) for language, cases in EARLY_EXITS.items() for name in cases]


@pytest.mark.parametrize("language, case", CASES)
def test_exiting_zero_before_the_tests_is_not_a_pass(runner, language, case):
    require_toolchain(language)
    problem = load_problems(language)[0]
    record = runner.run(assemble_program(problem, EARLY_EXITS[language][case], truncate=False))
    assert record["verdict"] == "failed", record
    if record["returncode"] == 0:  # exactly what the exit-status rule took for a pass
        assert record["reason"] == "no_completion_marker", record


def test_a_go_test_main_that_never_runs_the_tests_is_not_a_pass(runner):
    require_toolchain("go")
    problem = load_problems("go")[0]
    completion = problem.canonical_solution + "\nfunc TestMain(m *testing.M) {\n    os.Exit(0)\n}\n"
    record = runner.run(assemble_program(problem, completion, truncate=False))
    # The harness has its own TestMain (it prints the marker after m.Run): a second one cannot compile.
    assert record["verdict"] == "compile_error" and "multiple definitions of TestMain" in record["output_tail"], record


@pytest.mark.parametrize("language", ["go", "python"])
def test_a_flood_cut_at_the_output_cap_is_not_a_pass_even_with_the_right_answer(runner, language):
    """Go ignores the failed writes past RLIMIT_FSIZE and returns the right value: before, exit 0
    was a pass although its own PASS line was never written."""
    require_toolchain(language)
    problem = load_problems(language)[0]
    flood = {"go": ('    s := strings.Repeat("x", 65536)\n    for i := 0; i < 400; i++ {\n'
                    '        os.Stdout.WriteString(s)\n    }\n'),
             "python": "    import sys\n    for _ in range(400):\n        sys.stdout.write('x' * 65536)\n"}[language]
    record = runner.run(assemble_program(problem, flood + problem.canonical_solution, truncate=False))
    assert record["verdict"] == "failed", record
    assert record["reason"] in ("output_limit", "exit_status"), record  # python dies of SIGXFSZ
    if language == "go":
        assert record["reason"] == "output_limit", record


def test_javascript_passes_only_with_the_marker_and_nothing_else(runner):
    require_toolchain("js")
    problem = load_problems("js")[0]
    body = problem.canonical_solution
    assert runner.run(assemble_program(problem, body, truncate=False))["verdict"] == "passed"
    chatty = runner.run(assemble_program(problem, body.replace("return false;", "console.log('x'); return false;", 1),
                                         truncate=False))
    assert (chatty["verdict"], chatty["reason"]) == ("failed", "unexpected_output"), chatty


@pytest.mark.parametrize("language", ["python", "cpp", "java", "js", "go"])
def test_the_canonical_solution_still_passes_and_prints_the_marker_last(runner, language):
    require_toolchain(language)
    problem = load_problems(language)[0]
    record = runner.run(assemble_program(problem, problem.canonical_solution))
    assert record["verdict"] == "passed", record
    last = record["output_tail"].strip().splitlines()[-1]
    assert len(last) == 32 and int(last, 16) >= 0  # the marker: 128 random bits, in hex
    assert last not in assemble_program(problem, problem.canonical_solution).source


def test_every_failure_reason_is_explained():
    assert set(FAILURE_REASONS) == {"exit_status", "output_limit", "no_completion_marker", "unexpected_output"}
