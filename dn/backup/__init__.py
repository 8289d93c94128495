"""Backups to the second EU region and restore drills.

- ``crypto``    streaming authenticated encryption of backup artifacts (AES-256-GCM, chunked)
- ``keys``      per-tenant and platform data keys, wrapped with a key derived from dn's passphrase
- ``manifest``  what a backup holds: snapshot time, row counts, artifact sizes and checksums
- ``retention`` pure selection of what to keep (30 daily + monthly copies)
- ``schedule``  systemd OnCalendar evaluation (next/previous scheduled run)
- ``dump``      pg_dump / COPY producers and pg_restore consumers
- ``store``     the second-region store over SFTP: atomic upload, listing, download
- ``drill``     restore drills and real restores: download, verify, decrypt, restore, compare
- ``alert``     the failure hook (a command with JSON on stdin, or SMTP)
"""
