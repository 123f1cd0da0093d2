package main

// benchPolicy grants the bench namespace's api service account its own secrets only.
const benchPolicy = `
environments:
  - {name: prod, vaultMount: kv, vaultPrefix: prod, vaultRole: prod}
grants:
  - namespace: bench
    serviceAccount: api
    paths: ["bench/*"]
`
