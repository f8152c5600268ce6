"""The README's torch example runs as written."""

from maskbn_conformance.readme import readme_example


def test_readme_torch_example_runs():
    namespace: dict = {}
    exec(compile(readme_example("torch"), "README.md (torch example)", "exec"), namespace)
