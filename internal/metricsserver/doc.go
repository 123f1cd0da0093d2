// Package metricsserver serves a daemon's loopback HTTP listener (/metrics and health endpoints) and
// checks that its address is a loopback one: the one place both Keyward daemons do so.
//
// It may import the standard library only.
package metricsserver
