#!/usr/bin/env python3
"""Generates a Python client from a running server's OpenAPI document with
openapi-python-client (from PyPI) and uses it, as a user's script would, to
create, list, show and delete a VM: proof that the document is a usable
contract, not only a valid one.

    client-check.py URL TOKEN WORKDIR   (run with the venv's python)
"""

import importlib
import json
import subprocess
import sys
import time
import urllib.request


def main():
    url, token, work = sys.argv[1], sys.argv[2], sys.argv[3]
    doc = f"{work}/openapi.json"
    with urllib.request.urlopen(f"{url}/v1/openapi.json", timeout=30) as r, open(doc, "wb") as f:
        f.write(r.read())
    gen = subprocess.run(
        [f"{sys.prefix}/bin/openapi-python-client", "generate", "--path", doc,
         "--meta", "none", "--output-path", f"{work}/skyvisor_client", "--overwrite"],
        capture_output=True, text=True)
    if gen.returncode != 0:
        sys.exit(f"generation failed:\n{gen.stdout}\n{gen.stderr}")
    sys.path.insert(0, work)
    client_mod = importlib.import_module("skyvisor_client")
    models = importlib.import_module("skyvisor_client.models")
    create = importlib.import_module("skyvisor_client.api.instances.post_instances")
    listing = importlib.import_module("skyvisor_client.api.instances.get_instances")
    show = importlib.import_module("skyvisor_client.api.instances.get_instances_by_name")
    delete = importlib.import_module("skyvisor_client.api.instances.delete_instances_by_name")

    client = client_mod.AuthenticatedClient(base_url=url, token=token)
    body = models.CreateInstanceRequestType0.from_dict(
        {"name": "genclient", "image": "debian-busybox", "instance_type": "nano", "start": False})
    made = create.sync_detailed(client=client, body=body)
    if made.status_code != 201:
        sys.exit(f"create answered {made.status_code}: {made.content!r}")
    assert made.parsed.spec.name == "genclient", made.parsed
    names = [i.spec.name for i in listing.sync(client=client)]
    assert "genclient" in names, names
    one = show.sync(name="genclient", client=client)
    assert one.spec.project == "default", one.spec.project
    gone = delete.sync_detailed(name="genclient", client=client, force=True)
    if gone.status_code != 202:
        sys.exit(f"delete answered {gone.status_code}: {gone.content!r}")
    deadline = time.time() + 60
    while time.time() < deadline:
        if show.sync_detailed(name="genclient", client=client).status_code == 404:
            print(json.dumps({"created": True, "listed": True, "deleted": True}))
            return
        time.sleep(0.2)
    sys.exit("the deleted VM never went away")


if __name__ == "__main__":
    main()
