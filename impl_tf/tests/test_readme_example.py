"""The README's tf example runs as written."""

from maskbn_conformance.readme import readme_example


def test_readme_tf_example_runs():
    namespace: dict = {}
    exec(compile(readme_example("tf"), "README.md (tf example)", "exec"), namespace)
