from tests.vllm.conftest import tiny_lora, tiny_model  # noqa: F401 - the generated model (and adapter) the replicas serve
