#!/usr/bin/env python3
"""Seeds a running control plane for scripts/bench.sh: an image, a tenant and N machines,
through the public API only. Prints the tenant's access token on stdout."""
import http.client
import json
import sys

host, port, admin_password, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
conn = http.client.HTTPConnection(host, port)


def call(method, path, body=None, token=None, expect=(200, 201, 202)):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn.request(method, "/api/v1" + path, json.dumps(body) if body is not None else None, headers)
    res = conn.getresponse()
    data = res.read()
    if res.status not in expect:
        sys.exit(f"{method} {path}: {res.status} {data[:300]!r}")
    return json.loads(data) if data else None


def login(username, password):
    return call("POST", "/auth/login", {"username": username, "password": password})["access_token"]


admin = login("root", admin_password)
call("POST", "/images", {"name": "tiny", "source": "file:///var/lib/skygate/images/tiny.qcow2",
                         "format": "qcow2"}, admin)
call("POST", "/auth/register", {"username": "bench", "email": "bench@example.com",
                                "password": "bench passphrase 1"})
token = login("bench", "bench passphrase 1")
for i in range(count):
    call("POST", "/machines", {"hostname": f"m{i}", "image": "tiny", "vcpus": 1,
                               "memory_mib": 256, "disk_gib": 1}, token)
print(token)
