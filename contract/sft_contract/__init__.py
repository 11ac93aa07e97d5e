"""The contract between the operator and the trainer: the training spec, the wire messages, exit codes,
source references, the memory estimate and the offline evaluation of the CRD's CEL rules. Imports only the
standard library, pydantic and (in ``cel``, when a rule is evaluated) the CEL library."""
