from tests.vllm.conftest import tiny_model  # noqa: F401 - the generated model the replicas serve
