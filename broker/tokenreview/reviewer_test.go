package tokenreview

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/client-go/rest"
)

// NewReviewer posts a protobuf TokenReview to the authentication.k8s.io/v1 path and decodes the
// answer (kube-apiserver itself is in test/e2e; this pins the wire format and path).
func TestReviewerPostsProtobufTokenReviews(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := authenticationv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	var gotPath, gotType, gotToken string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotPath, gotType = r.URL.Path, r.Header.Get("Content-Type")
		body, _ := io.ReadAll(r.Body)
		obj, _, err := protobuf.NewSerializer(scheme, scheme).Decode(body, nil, nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		tr := obj.(*authenticationv1.TokenReview)
		gotToken = tr.Spec.Token
		tr.Status = authenticationv1.TokenReviewStatus{Authenticated: true, Audiences: tr.Spec.Audiences, User: podUser("ns", "sa", "p", "u")}
		tr.APIVersion, tr.Kind = "authentication.k8s.io/v1", "TokenReview"
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(tr)
	}))
	defer srv.Close()
	rv, err := NewReviewer(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	out, err := rv.Create(context.Background(), &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: "tok", Audiences: []string{"keyward"}}})
	if err != nil {
		t.Fatal(err)
	}
	if gotPath != "/apis/authentication.k8s.io/v1/tokenreviews" || gotType != runtime.ContentTypeProtobuf || gotToken != "tok" {
		t.Fatalf("request: path %q, content type %q, token %q", gotPath, gotType, gotToken)
	}
	if !out.Status.Authenticated || out.Status.User.Extra[ExtraPodUID][0] != "u" {
		t.Fatalf("decoded answer %+v", out.Status)
	}
}
