"""Helm for the test suite: the Helm v4 Go library through helm-sdkpy (there is no helm binary here).

One action per call, one JSON document on stdout, exit status 1 with the error on stderr:

    helm.py lint CHART
    helm.py install KUBECONFIG NAMESPACE RELEASE CHART VALUES_JSON   -> {"manifest": ...}
    helm.py uninstall KUBECONFIG NAMESPACE RELEASE

`install` does not wait for the workloads: the test control plane runs no pods.
"""

import asyncio
import json
import sys

import helm_sdkpy as helm


async def lint(chart):
    result = await helm.Lint(helm.Configuration()).run(chart)
    # The library serializes lint errors as empty objects: keep the severity and the file.
    return {
        "messages": [{"severity": m["Severity"], "path": m["Path"]} for m in result.get("Messages") or []],
        "errors": len(result.get("Errors") or []),
    }


async def install(kubeconfig, namespace, release, chart, values):
    config = helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    result = await helm.Install(config).run(
        release, chart, values=json.loads(values), create_namespace=True, wait=False, timeout=120
    )
    return {"manifest": result["manifest"]}


async def uninstall(kubeconfig, namespace, release):
    config = helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    result = await helm.Uninstall(config).run(release, wait=True, timeout=120)
    return {"status": result["release"]["info"]["status"]}


ACTIONS = {"lint": lint, "install": install, "uninstall": uninstall}


def main():
    action = ACTIONS[sys.argv[1]]
    try:
        result = asyncio.run(action(*sys.argv[2:]))
    except helm.HelmError as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
