"""Test suite root: loads the fixtures that start real services (PostgreSQL, the sandbox EU host).

Tests that need the sandbox are marked ``sandbox``; PostgreSQL ``postgres``; the real Pulumi
engine ``engine``. When a prerequisite is missing the test is skipped with the reason printed
(pytest runs with -ra), never silently.
"""
pytest_plugins = ("tests.fixtures.postgres", "tests.fixtures.sandbox")
