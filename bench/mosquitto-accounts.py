#!/usr/bin/env python3
"""Adds nodes' accounts to a Mosquitto dynamic security file, as the
coordinator makes them one by one (docs/mosquitto.md), for a load test of
authenticated logins without waiting for the plugin to make thousands of
accounts (it rewrites its whole file after every change).

    coordinator-load --key-seed 7 --nodes 10000 --print-accounts > accounts
    bench/mosquitto-accounts.py DYNSEC.json PREFIX < accounts

Run it while Mosquitto is stopped; start it again afterwards.
"""
import base64
import hashlib
import json
import os
import sys


def main() -> None:
    path, prefix = sys.argv[1], sys.argv[2]
    with open(path) as f:
        config = json.load(f)
    clients = {c["username"]: c for c in config["clients"]}
    roles = {r["rolename"]: r for r in config["roles"]}
    added = 0
    for line in sys.stdin:
        user, password = line.split()
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
        role = f"pluto-node-{user}"
        acls = [
            {"acltype": "publishClientSend", "topic": f"{prefix}/v1/to-coordinator/{user}", "priority": 0, "allow": True},
            {"acltype": "publishClientSend", "topic": f"{prefix}/v1/presence/{user}", "priority": 0, "allow": True},
            {"acltype": "subscribeLiteral", "topic": f"{prefix}/v1/to-node/{user}", "priority": 0, "allow": True},
        ]
        roles[role] = {"rolename": role, "acls": acls}
        clients[user] = {
            "username": user,
            "roles": [{"rolename": role}],
            "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(),
            "iterations": 101,
        }
        added += 1
    config["clients"] = list(clients.values())
    config["roles"] = list(roles.values())
    with open(path + ".new", "w") as f:
        json.dump(config, f)
    os.replace(path + ".new", path)
    print(f"{added} accounts in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
