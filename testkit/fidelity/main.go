// Command fidelity drives Google's own Go client libraries against the Google emulator, reached
// through the emulator's intercepting proxy (HTTPS_PROXY, SSL_CERT_FILE) and, for the metadata
// server, GCE_METADATA_HOST: the only settings a real user would make. Nothing here names an
// endpoint; the libraries use their built-in Google URLs.
//
// It checks what each library returned and prints one JSON line per check on stdout, with the
// SHA-256 of each token (never the token), for the test to match against what the emulator
// issued. It exits non-zero at the first failed check.
//
// Usage:
//
//	fidelity federation -target SA -audience AUD -lifetime D -impersonated-config FILE
//	    with GOOGLE_APPLICATION_CREDENTIALS naming an external_account configuration with a
//	    file-sourced subject token, and FILE the same configuration with
//	    service_account_impersonation_url set (for SA).
//	fidelity federated-id-token -target SA -audience AUD -lifetime D
//	    with GOOGLE_APPLICATION_CREDENTIALS naming that second configuration.
//	fidelity metadata -email SA -project ID -audience AUD -lifetime D
//	    with GCE_METADATA_HOST set.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"cloud.google.com/go/compute/metadata"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"
	"google.golang.org/api/idtoken"
	"google.golang.org/api/impersonate"
)

const cloudPlatform = "https://www.googleapis.com/auth/cloud-platform"

// impersonationLifetime is what the impersonation check asks for: not the emulator's default, so
// the answer shows that the request's lifetime reached it.
const impersonationLifetime = 15 * time.Minute

// slack covers the time between the emulator minting a token and the library computing its expiry.
const slack = 30 * time.Second

// result is one line of output.
type result struct {
	Check string `json:"check"`
	// TokenSHA256 is the hex SHA-256 of the token the library returned.
	TokenSHA256 string `json:"token_sha256,omitempty"`
	// ExpiresInSeconds is the token's expiry as the library saw it, from now.
	ExpiresInSeconds int64             `json:"expires_in_seconds,omitempty"`
	Values           map[string]string `json:"values,omitempty"`
}

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: fidelity federation|metadata [flags]"))
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	target := flags.String("target", "", "service account to impersonate")
	impersonated := flags.String("impersonated-config", "", "external_account configuration with service_account_impersonation_url")
	email := flags.String("email", "", "the metadata server's service account")
	project := flags.String("project", "", "the metadata server's project ID")
	audience := flags.String("audience", "", "ID token audience")
	lifetime := flags.Duration("lifetime", time.Hour, "lifetime of the emulator's tokens")
	if err := flags.Parse(os.Args[2:]); err != nil {
		fail(err)
	}
	ctx := context.Background()
	var err error
	switch os.Args[1] {
	case "federation":
		err = federation(ctx, *impersonated, *target, *audience, *lifetime)
	case "federated-id-token":
		err = federatedIDToken(ctx, *target, *audience, *lifetime)
	case "metadata":
		err = onMetadata(ctx, *email, *project, *audience, *lifetime)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

// federation: Workload Identity Federation as a workload outside Google runs it.
func federation(ctx context.Context, impersonatedConfig, target, audience string, lifetime time.Duration) error {
	config, err := os.ReadFile(os.Getenv("GOOGLE_APPLICATION_CREDENTIALS"))
	if err != nil {
		return fmt.Errorf("reading GOOGLE_APPLICATION_CREDENTIALS: %w", err)
	}

	// 1. STS: the federated token itself.
	creds, err := google.CredentialsFromJSONWithType(ctx, config, google.ExternalAccount, cloudPlatform)
	if err != nil {
		return fmt.Errorf("sts: loading the external_account configuration: %w", err)
	}
	if err := checkToken("sts", creds.TokenSource, lifetime); err != nil {
		return err
	}

	// 1b. STS, then impersonation named in the configuration.
	withImpersonation, err := os.ReadFile(impersonatedConfig)
	if err != nil {
		return err
	}
	creds, err = google.CredentialsFromJSONWithType(ctx, withImpersonation, google.ExternalAccount, cloudPlatform)
	if err != nil {
		return fmt.Errorf("sts-impersonation: loading the configuration: %w", err)
	}
	if err := checkToken("sts-impersonation", creds.TokenSource, lifetime); err != nil {
		return err
	}

	// 2. Impersonation with Application Default Credentials as the caller.
	impersonated, err := impersonate.CredentialsTokenSource(ctx, impersonate.CredentialsConfig{
		TargetPrincipal: target,
		Scopes:          []string{cloudPlatform},
		Lifetime:        impersonationLifetime,
	})
	if err != nil {
		return fmt.Errorf("impersonate: %w", err)
	}
	if err := checkToken("impersonate", impersonated, impersonationLifetime); err != nil {
		return err
	}

	// 3. ID tokens, validated against Google's published keys (fetched through the proxy).
	ids, err := impersonate.IDTokenSource(ctx, impersonate.IDTokenConfig{
		TargetPrincipal: target,
		Audience:        audience,
		IncludeEmail:    true,
	})
	if err != nil {
		return fmt.Errorf("impersonate-id-token: %w", err)
	}
	return checkIDToken(ctx, "impersonate-id-token", ids, audience, target, lifetime)
}

// federatedIDToken: ID tokens for the service account that Application Default Credentials
// (an external_account configuration with service_account_impersonation_url) impersonate.
//
// Not with option.WithAuthCredentialsFile: in google.golang.org/api v0.312.0 that path hands
// cloud.google.com/go/auth an unauthenticated HTTP client, which then calls generateIdToken
// without credentials (Google, and the emulator, answer 401).
func federatedIDToken(ctx context.Context, target, audience string, lifetime time.Duration) error {
	ids, err := idtoken.NewTokenSource(ctx, audience)
	if err != nil {
		return fmt.Errorf("idtoken: %w", err)
	}
	return checkIDToken(ctx, "idtoken", ids, audience, target, lifetime)
}

// onMetadata: a workload on Google Compute Engine (or GKE), using the metadata server.
func onMetadata(ctx context.Context, email, project, audience string, lifetime time.Duration) error {
	if !metadata.OnGCEWithContext(ctx) {
		return errors.New("metadata: OnGCE is false")
	}
	gotEmail, err := metadata.EmailWithContext(ctx, "default")
	if err != nil {
		return fmt.Errorf("metadata: email: %w", err)
	}
	gotProject, err := metadata.ProjectIDWithContext(ctx)
	if err != nil {
		return fmt.Errorf("metadata: project-id: %w", err)
	}
	if gotEmail != email || gotProject != project {
		return fmt.Errorf("metadata: email %q, project %q; want %q, %q", gotEmail, gotProject, email, project)
	}
	emit(result{Check: "metadata", Values: map[string]string{"email": gotEmail, "project": gotProject}})

	if err := checkToken("compute", google.ComputeTokenSource("", cloudPlatform), lifetime); err != nil {
		return err
	}

	// Application Default Credentials find the metadata server with nothing else configured.
	creds, err := google.FindDefaultCredentials(ctx, cloudPlatform)
	if err != nil {
		return fmt.Errorf("default-credentials: %w", err)
	}
	universe, err := creds.GetUniverseDomain()
	if err != nil {
		return fmt.Errorf("default-credentials: universe domain: %w", err)
	}
	if creds.ProjectID != project || universe != "googleapis.com" {
		return fmt.Errorf("default-credentials: project %q, universe %q", creds.ProjectID, universe)
	}
	if err := checkToken("default-credentials", creds.TokenSource, lifetime); err != nil {
		return err
	}

	ids, err := idtoken.NewTokenSource(ctx, audience)
	if err != nil {
		return fmt.Errorf("metadata-id-token: %w", err)
	}
	return checkIDToken(ctx, "metadata-id-token", ids, audience, email, lifetime)
}

// checkToken gets a token and checks that it is there and expires about `lifetime` from now.
func checkToken(check string, source oauth2.TokenSource, lifetime time.Duration) error {
	token, err := source.Token()
	if err != nil {
		return fmt.Errorf("%s: %w", check, err)
	}
	if token.AccessToken == "" {
		return fmt.Errorf("%s: empty token", check)
	}
	expiresIn := time.Until(token.Expiry)
	if expiresIn <= 0 || expiresIn > lifetime+slack || expiresIn < lifetime-slack {
		return fmt.Errorf("%s: the token expires in %v; want about %v", check, expiresIn, lifetime)
	}
	emit(result{Check: check, TokenSHA256: digest(token.AccessToken), ExpiresInSeconds: int64(expiresIn.Seconds())})
	return nil
}

// checkIDToken gets an ID token, validates it as Google's own, and checks its claims.
func checkIDToken(ctx context.Context, check string, source oauth2.TokenSource, audience, email string, lifetime time.Duration) error {
	token, err := source.Token()
	if err != nil {
		return fmt.Errorf("%s: %w", check, err)
	}
	payload, err := idtoken.Validate(ctx, token.AccessToken, audience)
	if err != nil {
		return fmt.Errorf("%s: validating: %w", check, err)
	}
	if payload.Issuer != "https://accounts.google.com" || payload.Audience != audience || payload.Subject == "" {
		return fmt.Errorf("%s: iss %q, aud %q, sub %q", check, payload.Issuer, payload.Audience, payload.Subject)
	}
	if got := payload.Claims["email"]; got != email || payload.Claims["email_verified"] != true {
		return fmt.Errorf("%s: email %v (verified %v); want %q", check, got, payload.Claims["email_verified"], email)
	}
	issuedFor := time.Duration(payload.Expires-payload.IssuedAt) * time.Second
	if issuedFor != lifetime {
		return fmt.Errorf("%s: exp - iat is %v; want %v", check, issuedFor, lifetime)
	}
	expiresIn := time.Until(time.Unix(payload.Expires, 0))
	if expiresIn <= 0 {
		return fmt.Errorf("%s: expired %v ago", check, -expiresIn)
	}
	emit(result{
		Check:            check,
		TokenSHA256:      digest(token.AccessToken),
		ExpiresInSeconds: int64(expiresIn.Seconds()),
		Values:           map[string]string{"email": email, "sub": payload.Subject},
	})
	return nil
}

func digest(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

func emit(r result) {
	line, err := json.Marshal(r)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(line))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "fidelity:", err)
	os.Exit(1)
}
