-- Operation locks name their holder's process exactly (see dn/locks.py, "Taking over").
--
-- With the machine's boot id, the holder's pid namespace and the kernel's start time of its
-- pid, a later run on the same machine can prove the holder dead (its pid is gone, or is now
-- another process) and take the lock over instead of waiting for a person to break it. Rows
-- written before this migration have NULLs here: their holder can only be judged by age.

ALTER TABLE op_locks
    ADD COLUMN boot_id   text,
    ADD COLUMN pid_ns    text,
    ADD COLUMN pid_start bigint;
