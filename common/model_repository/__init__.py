"""What the builder (which writes model repositories) and every reader (the gateway, the Triton
launcher, the load test, the benchmarks) share: the manifest schema, Triton config read/write,
the repository's names and paths, dtype maps, atomic writes and the error family.

It lives in ``server/`` because the gateway is the base layer: it installs and starts without
the builder, onnx or torch. The builder imports this package, never the reverse.
"""

from common.model_repository.atomic import atomic_write_bytes, atomic_write_text
from common.model_repository.dtypes import (
    config_type_to_datatype,
    from_config_type,
    from_datatype,
    to_config_type,
    to_datatype,
)
from common.model_repository.errors import (
    ConfigFileError,
    DtypeError,
    ManifestError,
    RepositoryError,
    SchemaVersionError,
)
from common.model_repository.manifest import (
    LABELLED,
    LLM_TASK,
    QUALITY_SOURCES,
    SCHEMA_VERSION,
    SYNTHETIC,
    UNLABELLED,
    LlmModelRecord,
    LlmSpeed,
    LlmVariantRecord,
    Manifest,
    TensorSpec,
    VariantRecord,
    load_manifest,
    load_manifests,
)
from common.model_repository.naming import (
    CONFIG_NAME,
    GENAI_FOLDER,
    MANIFEST_SUFFIX,
    MODEL_FILENAME,
    PYTHON_MODEL_FILENAME,
    SAMPLES_LABELS_KEY,
    SAMPLES_SUFFIX,
    VERSION,
    config_path,
    manifest_path,
    samples_path,
    variant_name,
)
from common.model_repository.triton_config import (
    ServingOptions,
    build_model_config,
    parse_config_text,
    read_config,
    serving_options_from_config,
    write_config,
)

__all__ = [
    "CONFIG_NAME",
    "GENAI_FOLDER",
    "LABELLED",
    "LLM_TASK",
    "MANIFEST_SUFFIX",
    "MODEL_FILENAME",
    "PYTHON_MODEL_FILENAME",
    "QUALITY_SOURCES",
    "SAMPLES_LABELS_KEY",
    "SAMPLES_SUFFIX",
    "SCHEMA_VERSION",
    "SYNTHETIC",
    "UNLABELLED",
    "VERSION",
    "ConfigFileError",
    "DtypeError",
    "LlmModelRecord",
    "LlmSpeed",
    "LlmVariantRecord",
    "Manifest",
    "ManifestError",
    "RepositoryError",
    "SchemaVersionError",
    "ServingOptions",
    "TensorSpec",
    "VariantRecord",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_model_config",
    "config_path",
    "config_type_to_datatype",
    "from_config_type",
    "from_datatype",
    "load_manifest",
    "load_manifests",
    "manifest_path",
    "parse_config_text",
    "read_config",
    "samples_path",
    "serving_options_from_config",
    "to_config_type",
    "to_datatype",
    "variant_name",
    "write_config",
]
