#!/usr/bin/env python3
"""Seeds a running control plane for scripts/bench-api.sh through the public API only: an image,
and three tenants: `lister` owning LISTED machines (the GET /machines row), `small` owning 10
and `big` owning OWNED (the POST /machines rows, to compare a new tenant with a large one).
Creates run on 8 connections. Prints one JSON object of access tokens on stdout."""
import http.client
import json
import sys
from concurrent.futures import ThreadPoolExecutor

host, port, admin_password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
listed, owned = int(sys.argv[4]), int(sys.argv[5])
PASSWORD = "bench passphrase 1"


def call(conn, method, path, body=None, token=None, expect=(200, 201, 202)):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn.request(method, "/api/v1" + path, json.dumps(body) if body is not None else None, headers)
    res = conn.getresponse()
    data = res.read()
    if res.status not in expect:
        sys.exit(f"{method} {path}: {res.status} {data[:300]!r}")
    return json.loads(data) if data else None


def login(conn, username, password):
    return call(conn, "POST", "/auth/login",
                {"username": username, "password": password})["access_token"]


def create_many(token, prefix, count):
    def chunk(first):
        conn = http.client.HTTPConnection(host, port)
        for i in range(first, count, 8):
            call(conn, "POST", "/machines", {"hostname": f"{prefix}{i}", "image": "tiny",
                                             "vcpus": 1, "memory_mib": 256, "disk_gib": 1}, token)
        conn.close()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(chunk, range(8)))


conn = http.client.HTTPConnection(host, port)
admin = login(conn, "root", admin_password)
call(conn, "POST", "/images", {"name": "tiny", "source": "file:///var/lib/skygate/images/tiny.qcow2",
                               "format": "qcow2"}, admin)
tokens = {}
for name, count in (("lister", listed), ("small", 10), ("big", owned)):
    call(conn, "POST", "/auth/register", {"username": name, "email": f"{name}@example.com",
                                          "password": PASSWORD})
    tokens[name] = login(conn, name, PASSWORD)
    create_many(tokens[name], "seed", count)
print(json.dumps(tokens))
