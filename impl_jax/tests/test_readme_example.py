"""The README's jax example runs as written."""

from maskbn_conformance.readme import readme_example


def test_readme_jax_example_runs():
    namespace: dict = {}
    exec(compile(readme_example("jax"), "README.md (jax example)", "exec"), namespace)
