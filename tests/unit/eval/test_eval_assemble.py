from __future__ import annotations

import re

import pytest

from eval_testing import requires_humaneval_x
from mft_core.eval import assemble as A
from mft_core.eval.problems import LANGUAGES, load_problems


@pytest.fixture(scope="module")
def problems():
    return {language: load_problems(language) for language in LANGUAGES}


def go_imports(source: str) -> list[str]:
    block = re.search(r"import \((.*?)\)", source, re.S).group(1)
    return re.findall(r'"([^"]+)"', block)


# ---- assembly per language ---------------------------------------------------------------------

@requires_humaneval_x
def test_python_program_is_prelude_prompt_completion_test(problems):
    problem = problems["python"][2]
    program = A.assemble_program(problem, "    return number % 1.0\n")
    assert program.filename == "program.py"
    codegeex = "\n".join(A.PYTHON_PRELUDE) + "\n" + problem.prompt + "    return number % 1.0\n" + "\n" + problem.test + "\n"
    head, tail = program.source.split(codegeex)  # CodeGeeX's program, between the marker's head and tail
    assert head.startswith("import os as _mft_os_") and f"read({A.MARKER_FD}, 256)" in head
    assert tail.rstrip().endswith("+ b'\\n')")


@requires_humaneval_x
def test_cpp_adds_only_missing_helper_includes(problems):
    problem = problems["cpp"][2]  # its prompt already has stdio.h and math.h
    program = A.assemble_program(problem, problem.canonical_solution)
    header = program.source[program.source.index("#include<"):program.source.index(problem.prompt)]
    assert "#include<stdio.h>" not in header and "#include<math.h>" not in header
    assert header.count("#include") == len(A.CPP_HELPER_INCLUDES) - 2
    renamed = re.search(r"#define main (mft_test_main_\w+)\n", program.source).group(1)
    assert (problem.canonical_solution.rstrip("\n").rstrip() + "\n" + f"#define main {renamed}\n" + problem.test
            in program.source)
    assert program.source.rstrip().endswith("return 0;\n}") and f"    {renamed}();" in program.source
    assert not program.links_crypto
    assert A.assemble_program(problems["cpp"][162], problems["cpp"][162].canonical_solution).links_crypto


@requires_humaneval_x
@pytest.mark.parametrize("language, filename", [("java", "Main.java"), ("js", "test.js")])
def test_java_and_js_are_prompt_completion_test(problems, language, filename):
    problem = problems[language][0]
    program = A.assemble_program(problem, problem.canonical_solution, truncate=False)
    assert program.filename == filename
    test = problem.test
    if language == "java":  # the test's class runs from the harness's Main, which prints the marker after it
        test = re.sub(r"public class Main\b", re.search(r"class (MftTest_\w+)", program.source).group(0), test)
        assert program.source.count("public class Main") == 1
    assert problem.prompt + problem.canonical_solution + "\n" + test in program.source


@requires_humaneval_x
def test_go_keeps_imports_the_test_needs(problems):
    # Go/2's test uses math.Abs: CodeGeeX's rule (completion only) would drop math.
    program = A.assemble_program(problems["go"][2], "    return number - float64(int(number))\n}\n")
    assert program.filename == "main_test.go"
    assert program.source.startswith("package main\n\nimport (\n")
    assert go_imports(program.source) == ["os", "testing", "github.com/stretchr/testify/assert", "math"]
    assert program.source.count("import") == 1  # the prompt's own import block is removed


@requires_humaneval_x
def test_go_drops_unused_setup_imports_and_ignores_comments(problems):
    # Go/162's test_setup imports crypto/md5, which its test never uses: a completion that
    # avoids md5 (mentioning it only in a comment) must not get "imported and not used".
    program = A.assemble_program(problems["go"][162], '    // md5.Sum would be right\n    return nil\n}\n')
    assert go_imports(program.source) == ["os", "testing", "github.com/stretchr/testify/assert"]
    # Go/38: the prompt uses math and strings, the test rand and time: all kept.
    program38 = A.assemble_program(problems["go"][38], problems["go"][38].canonical_solution)
    assert set(go_imports(program38.source)) >= {"math", "strings", "math/rand", "time"}
    # "math" must not count as used because "math/rand" (rand.) is
    program50 = A.assemble_program(problems["go"][50], problems["go"][50].canonical_solution)
    assert "math/rand" in go_imports(program50.source)
    assert "math" not in go_imports(program50.source)


@requires_humaneval_x
def test_go_65_prompt_without_import_block(problems):
    problem = problems["go"][65]
    assert not problem.prompt.lstrip().startswith("import")
    program = A.assemble_program(problem, problem.canonical_solution)
    assert "strconv" in go_imports(program.source)


# ---- truncation ---------------------------------------------------------------------------------

@requires_humaneval_x
def test_truncation_keeps_every_canonical_solution(problems):
    changed = []
    for language, items in problems.items():
        for problem in items:
            truncated = A.truncate_generation(language, problem.canonical_solution)
            if truncated.rstrip() != problem.canonical_solution.rstrip():
                changed.append(problem.task_id)
    # CPP/94's canonical solution carries a stray "#undef NDEBUG / #include<assert.h>" tail
    assert changed == ["CPP/94"]


def test_python_cut_at_first_unindented_line():
    text = "    x = 1\n\n    return x\nprint(f(1))\ndef g():\n    pass\n"
    assert A.truncate_generation("python", text) == "    x = 1\n\n    return x\n"
    assert A.generation_is_complete("python", text)
    assert not A.generation_is_complete("python", "    x = 1\n    return x\n")


def test_cpp_cut_at_int_main_and_function_end():
    text = "    return 1;\n}\nint helper() { return 2; }\nint main() { return 0; }\n"
    assert A.truncate_generation("cpp", text) == "    return 1;\n}"
    assert A.truncate_generation("cpp", "    return '}' == 1;\n  int main(){") == \
        "    return '}' == 1;\n  "
    assert A.generation_is_complete("cpp", text)


def test_brace_languages_keep_helpers_and_cut_at_top_level_statements():
    go = "    return helper(x)\n}\n\nfunc helper(a int) int {\n    return a\n}\n\nfunc main() {\n}\n"
    assert A.truncate_generation("go", go).endswith("func helper(a int) int {\n    return a\n}")
    js = ("  return 1;\n}\n\nconst helper = (x) => {\n  return '}'\n}\n"
          "console.log(f(1))\nconst later = 2\n")
    assert A.truncate_generation("js", js) == "  return 1;\n}\n\nconst helper = (x) => {\n  return '}'\n}"
    java = "        return 1;\n    }\n}\nclass Pair { int a; }\npublic class Main { }\n"
    assert A.truncate_generation("java", java) == "        return 1;\n    }\n}\nclass Pair { int a; }"
    assert A.generation_is_complete("go", go) and A.generation_is_complete("java", java)


def test_incomplete_generations():
    assert A.truncate_generation("java", "        return 1;\n    }\n") == "        return 1;\n    }\n}"
    assert A.truncate_generation("js", "  if (x) {\n    return 1;\n") == "  if (x) {\n    return 1;\n"
    assert not A.generation_is_complete("go", "    return x\n}\n\ncon")  # could become const
    assert A.function_is_closed("go", "    return x\n}\n\ncon")
    assert A.truncate_generation("go", "") == ""


def test_masking_blanks_comments_and_literals_but_keeps_length():
    code = 'a = "}{" + \'}\' // }\n/* { */ b = `x\n}` + 1'
    masked = A.mask_comments_and_strings(code, "js")
    assert len(masked) == len(code) and masked.count("\n") == code.count("\n")
    assert "{" not in masked and "}" not in masked
    assert masked.startswith('a = "  " + \' \'')


# What a model typically writes after each stop sequence.
_CONTINUATIONS = {
    "\ndef ": "\ndef g():\n    pass\n", "\nclass ": "\nclass A:\n    pass\n",
    "\nif __name__": "\nif __name__ == '__main__':\n    main()\n", "\nprint(": "\nprint(f(1))\n",
    "\n#": "\n# test\n", "\n@": "\n@decorator\ndef g():\n    pass\n", "\nassert ": "\nassert f(1)\n",
    "\nint main": "\nint main() {\n}\n",
    "\npublic class Main": "\npublic class Main {\n}\n", "\nclass Main": "\nclass Main {\n}\n",
    "\nconsole.log(": "\nconsole.log(f(1))\n", "\nmodule.exports": "\nmodule.exports = f\n",
    "\nconst test": "\nconst testF = () => {\n}\n",
    "\nfunc main(": "\nfunc main() {\n}\n", "\nfunc Test": "\nfunc TestF(t *testing.T) {\n}\n",
    "\npackage ": "\npackage main\n",
}


@requires_humaneval_x
def test_stop_sequences_never_cut_more_than_truncation(problems):
    for language, stops in A.STOP_SEQUENCES.items():
        for problem in problems[language][:20]:
            for stop in stops:
                assert _CONTINUATIONS[stop].startswith(stop)
                before_stop = problem.canonical_solution.rstrip("\n")
                continued = before_stop + _CONTINUATIONS[stop]
                assert (A.truncate_generation(language, before_stop).rstrip()
                        == A.truncate_generation(language, continued).rstrip()), (problem.task_id, stop)
