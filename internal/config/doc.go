// Package config holds what Keyward's configuration files share: strict YAML decoding (an unknown
// key is an error) and durations written as Go duration strings.
//
// It may import the standard library and sigs.k8s.io/yaml.
package config
