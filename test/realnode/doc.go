// Package realnode deploys Keyward on the harness's real node the way users deploy it: the images
// built from this tree (test/images) imported into the node's containerd, the broker DaemonSet from
// the kustomize render of deploy/overlays/dev, keyward-kms as the static pod of deploy/control-plane,
// the apiserver switched to deploy/control-plane's EncryptionConfiguration. The real-node e2e, the
// demo and nodebench share it, so the three run the same manifests patched the same way.
//
// It owns: the few patches this machine forces on the shipped manifests (each says why), applying
// them, waiting for the DaemonSet and kubelet's registration, provisioning a control-plane node for
// keyward-kms, and the pods that prove a volume from inside (secretcheck and its verdict).
//
// It may import the standard library, client-go and the Kubernetes API types, kustomize, test/harness,
// test/images and Keyward's packages that name the driver, the policy label and the audit records
// (csi, broker/policy). It returns errors and never takes a *testing.T: the demo and nodebench are
// programs.
package realnode
