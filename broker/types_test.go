package broker_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/internal/fault"
)

func TestSecretRefValidate(t *testing.T) {
	for ref, ok := range map[broker.SecretRef]bool{
		{Ref: "payments/db", Key: "password"}:                                true,
		{Ref: "payments/a/b/c", Key: "k.1_-", Version: 3}:                    true,
		{Ref: "payments/../billing/db", Key: "password"}:                     false,
		{Ref: "/payments/db", Key: "password"}:                               false,
		{Ref: "payments//db", Key: "password"}:                               false,
		{Ref: "payments/db/", Key: "password"}:                               false,
		{Ref: "payments/./db", Key: "password"}:                              false,
		{Ref: "payments/d b", Key: "password"}:                               false,
		{Ref: "payments/" + strings.Repeat("a", broker.MaxRefLen), Key: "k"}: false,
		{Ref: strings.Repeat("a/", broker.MaxSegments) + "a", Key: "k"}:      false,
		{Ref: "payments/db", Key: "a/b"}:                                     false,
		{Ref: "payments/db", Key: ""}:                                        false,
		{Ref: "payments/db", Key: "k", Version: -1}:                          false,
		{Ref: "", Key: "k"}:                                                  false,
	} {
		err := ref.Validate()
		if (err == nil) != ok || (err != nil && !errors.Is(err, fault.ErrInvalid)) {
			t.Errorf("%+v: %v", ref, err)
		}
	}
}

func FuzzValidateRef(f *testing.F) {
	for _, s := range []string{"payments/db", "../x", "a//b", "/a", "a/./b", "", "a/b/", "ü/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		if broker.ValidateRef(ref) != nil {
			return
		}
		// Accepted refs can never climb out of the environment prefix they are joined to.
		for _, seg := range strings.Split(ref, "/") {
			if seg == "" || seg == "." || seg == ".." {
				t.Fatalf("accepted %q", ref)
			}
		}
		if strings.HasPrefix(ref, "/") || len(ref) > broker.MaxRefLen || strings.ContainsAny(ref, "\\%?#* \x00") {
			t.Fatalf("accepted %q", ref)
		}
	})
}
