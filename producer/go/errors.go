package embedfleet

import (
	"fmt"
)

// TextError says why the text at Index of an Embed call got no vector. Code is one
// of the wire contract's error codes (empty_text, unsupported_dimensions, ...).
type TextError struct {
	Index   int
	Code    string
	Message string
}

func (e TextError) Error() string {
	return fmt.Sprintf("text %d: %s: %s", e.Index, e.Code, e.Message)
}

// BatchError is returned when some texts failed; the vectors Embed returns
// alongside it hold the others (nil where a text failed).
type BatchError struct {
	Failures []TextError
	Total    int
}

func (e *BatchError) Error() string {
	more := ""
	if len(e.Failures) > 1 {
		more = fmt.Sprintf(" (and %d more)", len(e.Failures)-1)
	}
	return fmt.Sprintf("embedfleet: %d of %d texts failed; %v%s", len(e.Failures), e.Total, e.Failures[0], more)
}

// TimeoutError is returned when results were still missing when ctx ended.
type TimeoutError struct {
	Missing, Total int
	Failures       []TextError
	Cause          error
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("embedfleet: %d of %d texts got no result (%v): is `embedfleet worker` running "+
		"and consuming the requests topic?", e.Missing, e.Total, e.Cause)
}

func (e *TimeoutError) Unwrap() error { return e.Cause }
