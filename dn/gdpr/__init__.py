"""GDPR deletion requests, retention enforcement, tenant export and Fernet key rotation.

- ``datamap``      the data map (policies/datamap.toml): loader, validation, coverage check
                   against the live database
- ``sqlgen``       identifiers and the per-table tenant conditions the other modules use (pure)
- ``plan``         the pure deletion planner: what is destroyed, erased, shredded, deleted, kept
- ``batches``      batched deletes with a lock timeout, so no lock is held long
- ``resources``    the host and backup steps of a deletion, over the components that own them
- ``workflow``     the journaled, resumable deletion (`dn gdpr delete`) and `dn gdpr status`
- ``certificate``  the deletion certificate (pure)
- ``retention``    `dn retention enforce`
- ``export``       `dn export`: a tenant's data as a streamed ZIP
- ``keys``         Fernet keys from the environment, MultiFernet rotation, key status
"""
