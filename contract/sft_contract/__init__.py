"""The contract between the operator and the trainer: the training spec, the wire messages, exit codes,
source references and the memory estimate. Imports only the standard library and pydantic."""
