from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from eval_testing import require_toolchain, requires_humaneval_x
from mft_core.eval.assemble import Program, assemble_program
from mft_core.eval.execute import normalize_samples, read_results
from mft_core.eval.problems import LANGUAGES, load_problems

pytestmark = requires_humaneval_x


def run_all(runner, programs: list[Program]) -> list[dict]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda item: runner.run(item[1], ("t", item[0])), enumerate(programs)))


@pytest.mark.parametrize("language", LANGUAGES)
def test_canonical_solutions_pass(runner, language):
    require_toolchain(language)
    problems = load_problems(language)[:3]
    results = run_all(runner, [assemble_program(p, p.canonical_solution) for p in problems])
    assert [r["verdict"] for r in results] == ["passed"] * 3, [r["output_tail"] for r in results]
    for record in results:
        assert record["run_s"] > 0 and record["cpu_s"] > 0
        assert (record["compile_s"] is not None) == (language in ("cpp", "java", "go"))


@pytest.mark.parametrize("language", LANGUAGES)
def test_shifted_solutions_fail(runner, language):
    require_toolchain(language)
    problems = load_problems(language)[:4]
    shifted = [assemble_program(problems[i], problems[i + 1].canonical_solution) for i in range(3)]
    results = run_all(runner, shifted)
    assert all(r["verdict"] in ("failed", "compile_error") for r in results), results


@pytest.mark.parametrize("language, body, verdict", [
    ("cpp", "    return undefined_name;\n}\n", "compile_error"),
    ("java", "        return undefinedName;\n    }\n}\n", "compile_error"),
    ("go", "    return undefinedName\n}\n", "compile_error"),
    ("python", "    raise SystemExit(3)\n", "failed"),
])
def test_compile_errors_and_failures_are_told_apart(runner, language, body, verdict):
    require_toolchain(language)
    problem = load_problems(language)[2]
    record = runner.run(assemble_program(problem, body))
    assert record["verdict"] == verdict
    assert not record["passed"]
    if verdict == "compile_error":
        assert record["run_s"] is None and record["output_tail"]  # the compiler's message
    else:
        assert record["returncode"] == 3


def test_javascript_output_is_a_failure(runner):
    require_toolchain("js")
    problem = load_problems("js")[2]
    chatty = "  console.log('debug');\n  return number % 1.0;\n}\n"
    record = runner.run(assemble_program(problem, chatty, truncate=False))
    assert record["verdict"] == "failed" and record["returncode"] == 0
    assert "debug" in record["output_tail"]


def test_go_completion_without_math_passes_with_fixed_imports(runner):
    require_toolchain("go")
    problem = load_problems("go")[2]  # the test uses math.Abs; the completion does not
    record = runner.run(assemble_program(problem, "    return number - float64(int(number))\n}\n"))
    assert record["verdict"] == "passed", record["output_tail"]


def test_plain_javac_path_gives_the_same_verdicts(tmp_path):
    require_toolchain("java")
    from eval_testing import fast_config
    from mft_core.eval.execute import ProgramRunner
    config = fast_config()
    config.java_compiler = "javac"
    problem = load_problems("java")[0]
    with ProgramRunner(config, workers=1) as plain:
        good = plain.run(assemble_program(problem, problem.canonical_solution))
        bad = plain.run(assemble_program(problem, "        return undefinedName;\n    }\n}\n"))
    assert good["verdict"] == "passed" and bad["verdict"] == "compile_error"


def test_normalize_samples_numbers_and_validates():
    samples = normalize_samples([
        {"task_id": "HumanEval/0", "completion": "a"},
        {"task_id": "Python/0", "generation": "b"},
        {"task_id": "Go/1", "generation": "c", "sample_index": 7},
    ])
    assert [(s.task_id, s.sample_index) for s in samples] == [("Python/0", 0), ("Python/0", 1), ("Go/1", 7)]
    with pytest.raises(ValueError, match="record 1: needs a string 'generation'"):
        normalize_samples([{"task_id": "Python/0"}])
    with pytest.raises(ValueError, match="record 2: duplicate sample"):
        normalize_samples([{"task_id": "Python/0", "generation": "", "sample_index": 0},
                           {"task_id": "Python/0", "generation": "", "sample_index": 0}])
    with pytest.raises(ValueError, match="not a HumanEval-X id"):
        normalize_samples([{"task_id": "Rust/0", "generation": ""}])


def test_read_results_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = {"task_id": "Python/0", "sample_index": 0, "passed": True}
    path.write_text(json.dumps(good) + "\n" + '{"task_id": "Python/1", "samp')
    assert list(read_results(path)) == [("Python/0", 0)]
    assert path.read_text() == json.dumps(good) + "\n"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="results.jsonl:1: not a result record"):
        read_results(path)


def test_java_server_survives_the_thread_that_started_it():
    # PR_SET_PDEATHSIG fires when the starting *thread* exits: the server must not use it.
    require_toolchain("java")
    import threading
    from eval_testing import fast_config
    from mft_core.eval.execute import ProgramRunner
    problems = load_problems("java")[:2]
    records = []
    with ProgramRunner(fast_config(), workers=1) as fresh:
        for problem in problems:
            worker = threading.Thread(target=lambda p=problem: records.append(
                fresh.run(assemble_program(p, p.canonical_solution))))
            worker.start()
            worker.join()
    assert [r["verdict"] for r in records] == ["passed", "passed"], records


def test_a_results_file_in_use_by_another_run_is_refused(tmp_path):
    import fcntl
    from mft_core.eval.execute import ResultsFileBusy, execute_samples
    path = tmp_path / "results.jsonl"
    with open(path, "a") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX)
        with pytest.raises(ResultsFileBusy, match="another run"):
            execute_samples([{"task_id": "Python/0", "generation": "    pass\n"}], path)
